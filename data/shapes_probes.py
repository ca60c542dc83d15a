"""Compositional probes from the shapes world, and a world of two-shape scenes to train on them.

A pair scene holds two single shapes of different kinds and colours, one to the left of (or above) the other, on a
plain or textured background. Its captions name both shapes and, in three of five, their relation
("a red circle to the left of a blue square", "a blue square to the right of a red circle", "a red circle and a
blue square", ...). The pair world mixes such scenes with the single-group scenes of data/shapes.py.

The probe set (`probes.json`: [{image, caption_options, correct, subset}], correct index 0, scored strictly: a tie
is wrong) has four subsets, each built from mirrored image pairs so that every caption is the right answer for one
image and the wrong one for another: a model that ignores the image, a text prior or a bag of words, scores
exactly chance (50%) at best.
- binding: "a red circle and a blue square" vs "a blue circle and a red square" (colours swapped between the
  shapes; the same words); the mirror image has the colours swapped.
- spatial: "a red circle to the left of a blue square" vs "... to the right of ..." (left/right, above/below).
- order: "a red circle to the left of a blue square" vs "a blue square to the left of a red circle" (ARO's
  VG-Relation swap: the same words, the objects' order exchanged).
- counts: "two red circles on the left" vs "three red circles on the left" (single-group scenes).

    python -m data.shapes_probes --out /tmp/pairs --n-train 1000
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from data.shapes import (BACKGROUNDS, COLORS, KINDS, NUMBER, PLURAL, POS_PHRASE, SIZES, _background,
                         _draw_shape, _pick, captions, render, sample_scene, split_ids)

RELATIONS = {"left": ("to the left of", "to the right of"), "above": ("above", "below")}
SUBSETS = ("binding", "spatial", "order", "counts")
VERSION = 1
# Independent random streams (as data/shapes.py's): scenes, rendering, probe scenes, probe rendering.
SCENES, RENDER, PROBES, PROBE_RENDER = range(4)


def sample_pair(rng) -> dict:
    ka, kb = rng.choice(len(KINDS), 2, replace=False)
    ca, cb = rng.choice(len(COLORS), 2, replace=False)
    colors = tuple(COLORS)
    return {"type": "pair", "a": {"kind": KINDS[ka], "color": colors[ca]},
            "b": {"kind": KINDS[kb], "color": colors[cb]}, "relation": _pick(rng, tuple(RELATIONS)),
            "background": _pick(rng, BACKGROUNDS)}


def render_pair(scene: dict, size: int, rng) -> Image.Image:
    """Shape a on the left of (or above) shape b, both large; `rng` jitters colour and placement slightly."""
    img = Image.fromarray(_background(scene["background"], size))
    draw = ImageDraw.Draw(img)
    r = SIZES["large"] * size / 2
    spots = ((0.28, 0.5), (0.72, 0.5)) if scene["relation"] == "left" else ((0.5, 0.28), (0.5, 0.72))
    for shape, (ux, uy) in zip((scene["a"], scene["b"]), spots):
        fill = tuple(int(c) for c in np.clip(np.array(COLORS[shape["color"]]) + rng.integers(-12, 13, 3), 0, 255))
        jx, jy = rng.uniform(-0.03, 0.03, 2) * size
        _draw_shape(draw, shape["kind"], ux * size + jx, uy * size + jy, r, fill)
    return img


def _np(shape) -> str:
    return f"a {shape['color']} {shape['kind']}"


def pair_captions(scene: dict) -> list[str]:
    """Five true captions of a pair scene."""
    a, b = _np(scene["a"]), _np(scene["b"])
    rel, inverse = RELATIONS[scene["relation"]]
    return [f"{a} {rel} {b}", f"{b} {inverse} {a}", f"{a} and {b}", f"{b} and {a}",
            f"{a} {rel} {b} on a {scene['background']} background"]


def count_caption(scene: dict, count: int) -> str:
    noun = scene["kind"] if count == 1 else PLURAL[scene["kind"]]
    return f"{NUMBER[count]} {scene['color']} {noun} {POS_PHRASE[scene['position']]}"


def probe_cases(rng, n_groups: int) -> list[tuple[dict, list[str], str]]:
    """(scene, [right caption, wrong caption], subset): n_groups mirrored pairs of cases per subset."""
    out = []
    for _ in range(n_groups):  # binding: the colours swapped between the shapes
        s = sample_pair(rng)
        m = dict(s, a=dict(s["a"], color=s["b"]["color"]), b=dict(s["b"], color=s["a"]["color"]))
        t, f = f"{_np(s['a'])} and {_np(s['b'])}", f"{_np(m['a'])} and {_np(m['b'])}"
        out += [(s, [t, f], "binding"), (m, [f, t], "binding")]
    for subset in ("spatial", "order"):
        for _ in range(n_groups):  # the mirror exchanges the two shapes' places
            s = sample_pair(rng)
            m = dict(s, a=s["b"], b=s["a"])
            rel, inverse = RELATIONS[s["relation"]]
            a, b = _np(s["a"]), _np(s["b"])
            if subset == "spatial":
                t, f = f"{a} {rel} {b}", f"{a} {inverse} {b}"
            else:
                t, f = f"{a} {rel} {b}", f"{b} {rel} {a}"
            out += [(s, [t, f], subset), (m, [f, t], subset)]
    for _ in range(n_groups):  # counts: the same scene with another number of shapes
        s = sample_scene(rng)
        other = _pick(rng, [c for c in NUMBER if c != s["count"]])
        m = dict(s, count=other)
        t, f = count_caption(s, s["count"]), count_caption(s, other)
        out += [(dict(s, type="single"), [t, f], "counts"), (dict(m, type="single"), [f, t], "counts")]
    return out


def _render(scene, size, rng):
    return render_pair(scene, size, rng) if scene.get("type") == "pair" else render(scene, size, rng)


def write_probes(out_dir, image_size=32, n_groups=100, seed=0) -> str:
    """probes.json + images/probes/*.png under out_dir (paths relative to it); returns the JSON's path."""
    rngs = [np.random.default_rng([seed, 100 + part]) for part in range(4)]
    os.makedirs(os.path.join(out_dir, "images", "probes"), exist_ok=True)
    records = []
    for n, (scene, options, subset) in enumerate(probe_cases(rngs[PROBES], n_groups)):
        path = f"images/probes/probe_{n:06d}.png"
        _render(scene, image_size, rngs[PROBE_RENDER]).save(os.path.join(out_dir, path), optimize=False)
        records.append({"image": path, "caption_options": options, "correct": 0, "subset": subset,
                        "group": n // 2, "scene": scene})
    out = os.path.join(out_dir, "probes.json")
    with open(out, "w") as f:
        json.dump(records, f)
    return out


def generate_pair_world(out_dir, n_train=1000, n_val=50, n_test=100, image_size=32, pair_fraction=0.5, seed=0,
                        probe_groups=100) -> dict[str, str]:
    """Karpathy-format retrieval/caption files (5 true captions per image) over single-group and pair scenes,
    scenes.json, and the probe set. Returns {name: absolute path}, as data.shapes.generate_shapes_world."""
    os.makedirs(out_dir, exist_ok=True)
    rngs = [np.random.default_rng([seed, part]) for part in range(4)]
    splits = split_ids(n_train, n_val, n_test)
    scenes, paths = {}, {}
    for split, ids in splits.items():
        os.makedirs(os.path.join(out_dir, "images", split), exist_ok=True)
        for i in ids:
            pair = rngs[SCENES].random() < pair_fraction
            scenes[i] = sample_pair(rngs[SCENES]) if pair else dict(sample_scene(rngs[SCENES]), type="single")
            paths[i] = f"images/{split}/shapes_{i:06d}.png"
            _render(scenes[i], image_size, rngs[RENDER]).save(os.path.join(out_dir, paths[i]), optimize=False)

    def caps(i):
        return pair_captions(scenes[i]) if scenes[i]["type"] == "pair" else captions(scenes[i])

    files = {}

    def write(name, obj):
        files[name] = f"{name}.json"
        with open(os.path.join(out_dir, files[name]), "w") as f:
            json.dump(obj, f)

    write("scenes", {str(i): dict(scenes[i], split=sp) for sp, ids in splits.items() for i in ids})
    write("karpathy_train", [{"image": paths[i], "caption": c, "image_id": str(i)}
                             for i in splits["train"] for c in caps(i)])
    for sp in ("val", "test"):
        write(f"karpathy_{sp}", [{"image": paths[i], "caption": caps(i)} for i in splits[sp]])
    write_probes(out_dir, image_size, probe_groups, seed)
    files["probes"] = "probes.json"
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump(files, f)
    out = {name: os.path.join(os.path.abspath(out_dir), f) for name, f in files.items()}
    out["root"] = os.path.abspath(out_dir)
    return out


def ensure_pair_world(spec: dict) -> dict:
    """generate_pair_world(**spec) unless the same world is on disk (data.worlds.ensure_shapes_world's hook)."""
    out = Path(spec["out_dir"])
    stamp, written = out / "spec.json", dict(spec, world="pairs", version=VERSION)
    if not (stamp.exists() and json.loads(stamp.read_text()) == written):
        generate_pair_world(**spec)
        stamp.write_text(json.dumps(written))
    return json.loads((out / "manifest.json").read_text())


def main(argv=None):
    p = argparse.ArgumentParser(description="Write the shapes probe set (and, with --n-train, a pair world).")
    p.add_argument("--out", required=True)
    p.add_argument("--n-train", type=int, default=0, help="0: the probe set only")
    p.add_argument("--n-val", type=int, default=50)
    p.add_argument("--n-test", type=int, default=100)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--groups", type=int, default=100, help="mirrored case pairs per subset")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.n_train:
        print(generate_pair_world(a.out, a.n_train, a.n_val, a.n_test, a.image_size, seed=a.seed,
                                  probe_groups=a.groups))
    else:
        print(write_probes(a.out, a.image_size, a.groups, a.seed))


if __name__ == "__main__":
    main()
