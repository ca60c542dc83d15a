"""The shapes world's visual-entailment set (SNLI-VE's format, ALBEF's files): image + hypothesis -> entailment,
neutral or contradiction, each decided by the scene's truth (scenes.json).

What makes a hypothesis neutral is something the image cannot show: every VE image has a curtain (a brown
rectangle). In an image of the *hidden* kind the curtain covers the whole region where a group at the scene's
position may lie, so the shapes are behind it: a statement about them is neither entailed nor contradicted. In an
image of the *visible* kind a smaller curtain hangs where the shapes are not, and the same statement is entailed
(its value is the scene's) or contradicted (another value). Every hypothesis is about the shapes (colour, size, kind,
count: not their position, which the hidden curtain's place gives away), and each template is exactly one third
entailment, neutral and contradiction, with its values drawn alike in the three, so the text alone scores 33.
The image alone tells neutral (no shape visible) from the rest but not entailment from contradiction: it scores 67.

Deterministic: one seed gives identical JSON and image bytes. Written under the world's folder:
ve_images/{split}/ve_{id}_{visible|hidden}.png and ve_{train,dev,test}.json.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import ImageDraw

from data.shapes import ATTRS, NUMBER, PLURAL, SIZES, _pick, layout, render

CURTAIN = (120, 72, 40)  # brown: no shape colour, no background grey
LABELS = ("contradiction", "neutral", "entailment")
# (template, attribute, how a value is written)
VE_TEMPLATES = (
    ("the shapes are {}", "color", str),
    ("the shapes are {}", "size", str),
    ("the shapes are {}", "kind", lambda k: PLURAL[k]),
    ("the number of shapes is {}", "count", lambda c: NUMBER[c]),
)
VERSION = 1


def _region(position: str) -> tuple[float, float, float, float]:
    """The box (unit coordinates) holding any group at `position`: every count, the large size, the jitter."""
    r = SIZES["large"] / 2 + 0.04
    pts = [p for count in (1, 2, 3) for p in layout(position, count)]
    xs, ys = [x for x, _ in pts], [y for _, y in pts]
    return (max(0.0, min(xs) - r), max(0.0, min(ys) - r), min(1.0, max(xs) + r), min(1.0, max(ys) + r))


def _group_box(scene) -> tuple[float, float, float, float]:
    r = SIZES[scene["size"]] / 2 + 0.04
    pts = layout(scene["position"], scene["count"])
    return (min(x for x, _ in pts) - r, min(y for _, y in pts) - r, max(x for x, _ in pts) + r,
            max(y for _, y in pts) + r)


def _free_box(scene, rng) -> tuple[float, float, float, float]:
    """A curtain where the shapes are not: a square at a random place clear of the group, smaller if need be."""
    gx0, gy0, gx1, gy1 = _group_box(scene)
    side = 0.3
    while True:
        for _ in range(100):
            x0, y0 = rng.uniform(0, 1 - side, 2)
            if x0 + side <= gx0 or x0 >= gx1 or y0 + side <= gy0 or y0 >= gy1:
                return x0, y0, x0 + side, y0 + side
        side *= 0.8


def render_ve(scene, size, hidden, rng):
    """The scene with its curtain: over the shapes' region (hidden) or clear of them (visible)."""
    img = render(scene, size, rng)
    x0, y0, x1, y1 = _region(scene["position"]) if hidden else _free_box(scene, rng)
    ImageDraw.Draw(img).rectangle((x0 * size, y0 * size, x1 * size - 1, y1 * size - 1), fill=CURTAIN)
    return img


def ve_examples(ids, scenes, paths, n, rng, templates=VE_TEMPLATES) -> list[dict]:
    """`n` hypotheses over the split's images, each template one third of each label (n a multiple of 3 × templates
    keeps them exact). paths[i] = (visible image, hidden image)."""
    out = []
    for k in rng.permutation(n).tolist():
        text, attr, word = templates[(k // 3) % len(templates)]
        label = LABELS[k % 3]
        i = _pick(rng, ids)
        truth = scenes[i][attr]
        if label == "entailment":
            value = truth
        elif label == "contradiction":
            value = _pick(rng, [v for v in ATTRS[attr] if v != truth])
        else:  # neutral: any value, as the other two draw theirs (uniform over the scenes' values)
            value = _pick(rng, ATTRS[attr])
        image = paths[i][1] if label == "neutral" else paths[i][0]
        out.append({"image": image, "sentence": text.format(word(value)), "label": label})
    return out


def generate_ve_set(root, statements_per_image=6, image_size=None, seed=0) -> dict[str, str]:
    """Render every scene of the world at `root` twice (curtain clear of the shapes / over them) and write
    ve_{train,dev,test}.json: statements_per_image × (images of the split) hypotheses each."""
    root = Path(root)
    scenes = {int(i): s for i, s in json.loads((root / "scenes.json").read_text()).items()}
    spec = json.loads((root / "spec.json").read_text()) if (root / "spec.json").exists() else {}
    size = image_size or spec.get("image_size", 64)
    rng = np.random.default_rng([seed, 101])
    paths, splits = {}, {}
    for i, scene in sorted(scenes.items()):
        split = scene["split"]
        splits.setdefault(split, []).append(i)
        os.makedirs(root / "ve_images" / split, exist_ok=True)
        paths[i] = tuple(f"ve_images/{split}/ve_{i:06d}_{kind}.png" for kind in ("visible", "hidden"))
        for path, hidden in zip(paths[i], (False, True)):
            render_ve(scene, size, hidden, rng).save(root / path, optimize=False)
    files = {}
    for split, name in (("train", "train"), ("val", "dev"), ("test", "test")):
        ids = splits.get(split, [])
        entries = ve_examples(ids, scenes, paths, statements_per_image * len(ids), rng) if ids else []
        files[f"ve_{name}"] = str(root / f"ve_{name}.json")
        with open(files[f"ve_{name}"], "w") as f:
            json.dump(entries, f)
    return files


def ensure_ve_set(root, ve_spec: dict) -> None:
    """Write the VE set of the world at `root` unless the same one is there (its own stamp: the world stays shared
    with the other shapes configs)."""
    stamp, written = Path(root) / "ve_spec.json", dict(ve_spec, version=VERSION)
    if not (stamp.exists() and json.loads(stamp.read_text()) == written):
        generate_ve_set(root, **ve_spec)
        stamp.write_text(json.dumps(written))


def ensure_shapes_ve_world(cfg):
    """train_ve.py's `prepare`: the shapes world of `shapes:` (data.worlds.ensure_shapes_world), then its VE set with
    the `shapes_ve:` arguments of generate_ve_set. Rank 0 writes, the others wait."""
    from blip import distributed as dist
    from data.worlds import ensure_shapes_world
    world = ensure_shapes_world(cfg)
    if world is not None and cfg.options is not None and cfg.options.shapes_ve is not None:
        if dist.is_main():
            ensure_ve_set(cfg.shapes["out_dir"], cfg.options.shapes_ve)
        dist.barrier()
    return world
