"""The shapes world: a small synthetic image-text world, written in every BLIP task's file format.

A scene is one group of 1-3 identical shapes (kind, colour, size) placed at one position on a plain
or textured background. Every caption, question and NLVR2 statement is generated from the scene
description, so each is true (or, where a wrong one is wanted, provably false). The vocabulary is
small and the shapes big and saturated, so a tiny model learns the tasks in CPU minutes.

Generation is deterministic: one seed gives identical JSON and image bytes.

    python -m data.shapes --out /tmp/shapes --n-train 1000
"""
from __future__ import annotations

import argparse
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLORS = {"red": (220, 30, 30), "green": (30, 160, 40), "blue": (30, 60, 220),
          "yellow": (235, 205, 20), "purple": (140, 40, 190), "orange": (245, 125, 0)}
KINDS = ("circle", "square", "triangle", "cross")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
SIZES = {"small": 0.14, "large": 0.24}  # shape diameter / image side
POSITIONS = ("left", "right", "top", "bottom", "center")
POS_PHRASE = {"left": "on the left", "right": "on the right", "top": "at the top",
              "bottom": "at the bottom", "center": "in the center"}
BACKGROUNDS = ("white", "black", "striped", "checkered")
NUMBER = {1: "one", 2: "two", 3: "three"}
ATTRS = {"kind": KINDS, "color": tuple(COLORS), "count": (1, 2, 3), "size": tuple(SIZES),
         "position": POSITIONS, "background": BACKGROUNDS}
# Independent random streams, so changing one part (say the image size) leaves the others alone.
SCENES, RENDER, PRETRAIN, VQA, NLVR, UNPAIRED = range(6)
# Bumped whenever the same arguments would write different files: a world on disk from an older version is redone.
VERSION = 2


def _pick(rng, options):
    return options[int(rng.integers(len(options)))]


def sample_scene(rng) -> dict:
    return {name: _pick(rng, options) for name, options in ATTRS.items()}


# ---- rendering ----

_SPREAD = {1: (0.5,), 2: (0.3, 0.7), 3: (0.18, 0.5, 0.82)}  # shapes never touch
_CENTER = {1: ((0.5, 0.5),), 2: ((0.38, 0.38), (0.62, 0.62)), 3: ((0.5, 0.32), (0.32, 0.66), (0.68, 0.66))}


def layout(position: str, count: int):
    """Shape centres in unit coordinates: a column (left/right), a row (top/bottom) or a cluster."""
    t = _SPREAD[count]
    return {"left": [(0.18, v) for v in t], "right": [(0.82, v) for v in t],
            "top": [(v, 0.18) for v in t], "bottom": [(v, 0.82) for v in t],
            "center": list(_CENTER[count])}[position]


def _background(kind: str, s: int) -> np.ndarray:
    y, x = np.mgrid[:s, :s]
    if kind == "white":
        gray = np.full((s, s), 235)
    elif kind == "black":
        gray = np.full((s, s), 25)
    elif kind == "striped":  # diagonal bands
        gray = np.where(((x + y) // max(2, s // 16)) % 2 == 0, 200, 110)
    else:  # checkered
        gray = np.where((x // max(2, s // 8) + y // max(2, s // 8)) % 2 == 0, 200, 110)
    return np.repeat(gray[..., None], 3, -1).astype(np.uint8)


def _draw_shape(draw, kind, cx, cy, r, fill):
    if kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif kind == "square":
        q = r * 0.9  # same visual weight as the circle
        draw.rectangle((cx - q, cy - q, cx + q, cy + q), fill=fill)
    elif kind == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=fill)
    else:  # cross: two bars
        w = r / 3
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)


def render(scene: dict, size: int, rng) -> Image.Image:
    """The scene as an RGB image; `rng` jitters colour and placement slightly."""
    img = Image.fromarray(_background(scene["background"], size))
    draw = ImageDraw.Draw(img)
    fill = tuple(int(c) for c in np.clip(np.array(COLORS[scene["color"]]) + rng.integers(-12, 13, 3), 0, 255))
    r = SIZES[scene["size"]] * size / 2
    for ux, uy in layout(scene["position"], scene["count"]):
        jx, jy = rng.uniform(-0.02, 0.02, 2) * size
        _draw_shape(draw, scene["kind"], ux * size + jx, uy * size + jy, r, fill)
    return img


# ---- text ----

def _noun(scene, kind=None):
    kind = kind or scene["kind"]
    return kind if scene["count"] == 1 else PLURAL[kind]


def captions(scene: dict) -> list[str]:
    """Five true captions, each naming the kind and count; they differ in what else they mention."""
    c, color, size, bg = scene["count"], scene["color"], scene["size"], scene["background"]
    num, art, be = NUMBER[c], ("a" if c == 1 else NUMBER[c]), ("is" if c == 1 else "are")
    noun, pos = _noun(scene), POS_PHRASE[scene["position"]]
    return [f"{num} {size} {color} {noun} {pos} of a {bg} background",
            f"a {bg} background with {art} {color} {noun} {pos}",
            f"there {be} {art} {size} {noun} {pos}",
            f"{num} {color} {noun} on a {bg} background",
            f"{art} {size} {color} {noun} {pos}"]


def wrong_caption(scene: dict, rng) -> str:
    """A caption of another scene with a different kind: every template names the kind, so it is false."""
    other = sample_scene(rng)
    other["kind"] = _pick(rng, [k for k in KINDS if k != scene["kind"]])
    return _pick(rng, captions(other))


def caption_is_true(caption: str, scene: dict) -> bool:
    """Whether a caption (ours or a model's) is true of the scene: it names a shape kind, and every
    attribute word it uses (colour, kind and its number, count, size, position, background) fits."""
    words = caption.lower().replace(".", " ").split()
    kinds = [k for k in KINDS if k in words] + [k for k in KINDS if PLURAL[k] in words]
    if not kinds or any(k != scene["kind"] for k in kinds):
        return False
    if (PLURAL[scene["kind"]] in words) != (scene["count"] > 1):
        return False
    checks = [(tuple(COLORS), scene["color"]), (tuple(SIZES), scene["size"]), (BACKGROUNDS, scene["background"]),
              (POSITIONS, scene["position"]), (tuple(NUMBER.values()), NUMBER[scene["count"]])]
    return all(w == truth for options, truth in checks for w in words if w in options)


def vqa_questions(scene: dict, rng) -> list[tuple[str, str, tuple]]:
    """(question, answer, answers of the same type) for each question type."""
    noun, be = _noun(scene), ("is" if scene["count"] == 1 else "are")
    kind, color = scene["kind"], scene["color"]
    ask_kind = kind if rng.random() < 0.5 else _pick(rng, [k for k in KINDS if k != kind])
    ask_color = color if rng.random() < 0.5 else _pick(rng, [c for c in COLORS if c != color])
    yes_no = ("yes", "no")
    return [(f"what color {be} the {noun}?", color, tuple(COLORS)),
            (_pick(rng, ["how many shapes are there?", f"how many {PLURAL[kind]} are there?"]),
             str(scene["count"]), ("1", "2", "3")),
            (f"is there a {ask_kind}?", "yes" if ask_kind == kind else "no", yes_no),
            (f"where {be} the {noun}?", scene["position"], POSITIONS),
            (f"what shape is {POS_PHRASE[scene['position']]}?", kind, KINDS),
            (f"what size {be} the {noun}?", scene["size"], tuple(SIZES)),
            ("what kind of background is it?", scene["background"], BACKGROUNDS),
            (f"{be} the {noun} {ask_color}?", "yes" if ask_color == color else "no", yes_no)]


def answer_list() -> list[str]:
    return sorted(set(COLORS) | set(KINDS) | set(SIZES) | set(POSITIONS) | set(BACKGROUNDS)
                  | {"1", "2", "3", "yes", "no"})


def _ten_answers(answer, options, rng) -> list[str]:
    """Ten annotators: all agree, except that 3 questions in 10 get one or two dissenters."""
    answers = [answer] * 10
    if rng.random() < 0.3:
        for i in range(int(rng.integers(1, 3))):
            answers[9 - i] = _pick(rng, [o for o in options if o != answer])
    return answers


# NLVR2 statements about a pair (a = left image, b = right image): (template, the attribute it is about,
# truth(a, b, value)); a template with {} takes a value of that attribute. Each template is exactly half true, half
# false, so the text alone predicts nothing: accuracy above 50% reads the images. Most name what a tiny model sees
# at 32 px (backgrounds, colours, sizes); two compare counts. None mentions a position inside an image: training
# swaps the words left/right with the images.
NLVR_TEMPLATES = (
    ("the left image has a {} background", "background", lambda a, b, v: a["background"] == v),
    ("the right image has a {} background", "background", lambda a, b, v: b["background"] == v),
    ("both images have a {} background", "background", lambda a, b, v: a["background"] == v == b["background"]),
    ("both images have the same background", "background", lambda a, b, v: a["background"] == b["background"]),
    ("the shapes in the left image are {}", "color", lambda a, b, v: a["color"] == v),
    ("the shapes in the right image are {}", "color", lambda a, b, v: b["color"] == v),
    ("there is a {} shape in both images", "color", lambda a, b, v: a["color"] == v == b["color"]),
    ("the shapes in both images have the same color", "color", lambda a, b, v: a["color"] == b["color"]),
    ("at least one image contains {} shapes", "size", lambda a, b, v: v in (a["size"], b["size"])),
    ("the left image has more shapes than the right image", "count", lambda a, b, v: a["count"] > b["count"]),
    ("both images have the same number of shapes", "count", lambda a, b, v: a["count"] == b["count"]),
)


def nlvr_examples(ids, scenes, paths, n, rng, about=None) -> list[dict]:
    """`n` statements over pairs of the given images, each template (and so the whole set) balanced between
    True and False; `about` keeps only the templates about those attributes (default: all)."""
    known = sorted({t[1] for t in NLVR_TEMPLATES})
    unknown = sorted(set(about or ()) - set(known))
    if unknown or (about is not None and not about):
        raise ValueError(f"nlvr_about: no NLVR2 template is about {unknown or about}; attributes: {known}")
    templates = [t for t in NLVR_TEMPLATES if about is None or t[1] in about]
    by_attr = {}
    for i in ids:
        for attr in ("background", "color", "count"):
            by_attr.setdefault((attr, scenes[i][attr]), []).append(i)

    def draw(template, want):  # (i, j, sentence) with the wanted truth, or None when this split seems to have none
        text, attr, truth = template
        for _ in range(1000):
            i = _pick(rng, ids)
            shared = _pick(rng, ("background", "color", "count"))
            # half the pairs share an attribute, so that "both images ..." can be true
            j = _pick(rng, by_attr[(shared, scenes[i][shared])] if rng.random() < 0.5 else ids)
            if i == j:
                continue
            a, b = scenes[i], scenes[j]
            value = _pick(rng, (a, b))[attr] if rng.random() < 0.5 else _pick(rng, ATTRS[attr])
            if truth(a, b, value) == want:
                return i, j, text.format(value)
        return None

    out = []
    for k in rng.permutation(n).tolist():
        t, want = (k // 2) % len(templates), k % 2 == 0  # (True, False) per template
        # a tiny split may make a template's wanted truth impossible ("same background" among 2 images): the next
        for d in range(len(templates)):
            drawn = draw(templates[(t + d) % len(templates)], want)
            if drawn is not None:
                break
        else:
            raise RuntimeError(f"could not draw an NLVR2 statement with label {want} from {len(ids)} images")
        i, j, sentence = drawn
        out.append({"images": [paths[i], paths[j]], "sentence": sentence, "label": str(want)})
    return out


# ---- writing every task's files ----

def _dump(obj, path):
    with open(path, "w") as f:
        json.dump(obj, f)


def _coco_gt(ids, scenes):
    anns = [{"image_id": i, "caption": c, "id": 0} for i in ids for c in captions(scenes[i])]
    for k, a in enumerate(anns):
        a["id"] = k
    return {"info": {}, "licenses": [], "type": "captions", "images": [{"id": i} for i in ids], "annotations": anns}


def _write_shards(entries, root, n_shards):
    os.makedirs(os.path.join(root, "pretrain_shards"), exist_ok=True)
    for s in range(n_shards):
        with tarfile.open(os.path.join(root, "pretrain_shards", f"shard-{s:05d}.tar"), "w", format=tarfile.USTAR_FORMAT) as tar:
            for k in range(s, len(entries), n_shards):
                e = entries[k]
                with open(os.path.join(root, e["image"]), "rb") as f:
                    image = f.read()
                for name, data in ((f"{k:08d}.png", image), (f"{k:08d}.txt", e["caption"].encode())):
                    info = tarfile.TarInfo(name)  # fixed metadata: byte-identical archives
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    tar.addfile(info, io.BytesIO(data))


def split_ids(n_train, n_val, n_test) -> dict[str, range]:
    """Image ids per split, numbered on from 1 across train, val and test."""
    return {"train": range(1, n_train + 1), "val": range(n_train + 1, n_train + n_val + 1),
            "test": range(n_train + n_val + 1, n_train + n_val + n_test + 1)}


def generate_shapes_world(out_dir, n_train=1000, n_val=100, n_test=100, image_size=64,
                          noise_fraction=0.3, seed=0, questions_per_image=3, n_shards=2,
                          statements_per_image=10, nlvr_about=None, *, n_text_only=0,
                          n_image_only=0) -> dict[str, str]:
    """Render the images and write every task's annotation files under `out_dir`; with n_text_only / n_image_only,
    also X-FM's unpaired data: captions of other scenes (text_only.json, [{caption}]) and images of other scenes
    without captions (image_only.json, [{image}]).

    Image paths in the files are relative to `out_dir` (the image root of every dataset). Returns
    {name: absolute path}; `manifest.json` holds the same names relative to `out_dir`.
    """
    os.makedirs(out_dir, exist_ok=True)
    rngs = [np.random.default_rng([seed, part]) for part in range(6)]
    splits = split_ids(n_train, n_val, n_test)
    scenes, paths = {}, {}
    for split, ids in splits.items():
        os.makedirs(os.path.join(out_dir, "images", split), exist_ok=True)
        for i in ids:  # the integer ending the file name is the image id (as COCO's)
            scenes[i] = sample_scene(rngs[SCENES])
            paths[i] = f"images/{split}/shapes_{i:06d}.png"
            render(scenes[i], image_size, rngs[RENDER]).save(os.path.join(out_dir, paths[i]), optimize=False)

    files = {}

    def write(name, obj, fname=None):
        files[name] = fname or f"{name}.json"
        _dump(obj, os.path.join(out_dir, files[name]))

    write("scenes", {str(i): dict(scenes[i], split=sp) for sp, ids in splits.items() for i in ids})

    # Pretraining (train images, one caption each), with a known share of wrong captions.
    rng = rngs[PRETRAIN]
    train = list(splits["train"])
    clean = [{"image": paths[i], "caption": _pick(rng, captions(scenes[i]))} for i in train]
    noisy_idx = set(rng.permutation(len(train))[: round(noise_fraction * len(train))].tolist())
    noise = [k in noisy_idx for k in range(len(train))]
    noisy = [dict(e, caption=wrong_caption(scenes[i], rng)) if bad else e for e, i, bad in zip(clean, train, noise)]
    write("pretrain", noisy)
    write("pretrain_clean", clean)
    write("pretrain_noise", noise)  # per pretrain.json entry: True = wrong caption
    if n_shards:
        _write_shards(noisy, out_dir, n_shards)
        files["pretrain_shards"] = "pretrain_shards/shard-*.tar"

    # COCO-Karpathy captioning / retrieval, with COCO-format ground truth for val and test.
    write("karpathy_train", [{"image": paths[i], "caption": c, "image_id": str(i)} for i in train for c in captions(scenes[i])])
    for sp in ("val", "test"):
        write(f"karpathy_{sp}", [{"image": paths[i], "caption": captions(scenes[i])} for i in splits[sp]])
        write(f"karpathy_{sp}_gt", _coco_gt(list(splits[sp]), scenes))
    write("nocaps_val", [{"image": paths[i], "img_id": i} for i in splits["val"]])

    # VQA: questions of distinct types per image; every split keeps its answers for accuracy.
    rng, qid = rngs[VQA], 0
    for sp in ("train", "val", "test"):
        entries = []
        for i in splits[sp]:
            qs = vqa_questions(scenes[i], rng)
            for t in rng.choice(len(qs), min(questions_per_image, len(qs)), replace=False).tolist():
                question, answer, options = qs[t]
                entries.append({"question_id": qid, "question": question, "answer": _ten_answers(answer, options, rng),
                                "image": paths[i], "dataset": "vqa"})
                qid += 1
        write(f"vqa_{sp}", entries)
    write("answer_list", answer_list())

    # NLVR2: statements_per_image × (images in the split) statements over random pairs of the split.
    rng = rngs[NLVR]
    for sp, name in (("train", "train"), ("val", "dev"), ("test", "test")):
        ids = list(splits[sp])
        n = statements_per_image * len(ids)
        write(f"nlvr_{name}", nlvr_examples(ids, scenes, paths, n, rng, nlvr_about) if len(ids) > 1 else [])

    # X-FM's unpaired data: scenes of their own (their own random stream: the files above stay as they were)
    rng = rngs[UNPAIRED]
    if n_text_only:
        write("text_only", [{"caption": _pick(rng, captions(sample_scene(rng)))} for _ in range(n_text_only)])
    if n_image_only:
        os.makedirs(os.path.join(out_dir, "images", "unpaired"), exist_ok=True)
        first = splits["test"].stop  # image ids number on after the test split's
        unpaired = [f"images/unpaired/shapes_{i:06d}.png" for i in range(first, first + n_image_only)]
        for path in unpaired:
            render(sample_scene(rng), image_size, rng).save(os.path.join(out_dir, path), optimize=False)
        write("image_only", [{"image": path} for path in unpaired])

    _dump(files, os.path.join(out_dir, "manifest.json"))
    out = {name: os.path.join(os.path.abspath(out_dir), f) for name, f in files.items()}
    out["root"] = os.path.abspath(out_dir)
    return out


def ensure_scene_world(spec: dict) -> dict:
    """generate_shapes_world(**spec) unless the same world is on disk; rank 0 writes, the others wait."""
    from blip import distributed as dist
    out = Path(spec["out_dir"])
    stamp, written = out / "spec.json", dict(spec, version=VERSION)
    if dist.is_main() and not (stamp.exists() and json.loads(stamp.read_text()) == written):
        generate_shapes_world(**spec)
        stamp.write_text(json.dumps(written))
    dist.barrier()
    return json.loads((out / "manifest.json").read_text())


def main(argv=None):
    p = argparse.ArgumentParser(description="Generate the shapes world in every BLIP task's format.")
    p.add_argument("--out", required=True)
    p.add_argument("--n-train", type=int, default=1000)
    p.add_argument("--n-val", type=int, default=100)
    p.add_argument("--n-test", type=int, default=100)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--noise-fraction", type=float, default=0.3)
    p.add_argument("--questions-per-image", type=int, default=3)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--statements-per-image", type=int, default=10, help="NLVR2 statements per image")
    p.add_argument("--nlvr-about", nargs="*", default=None, metavar="ATTRIBUTE",
                   help="NLVR2 statements only about these attributes (background color size count; default: all)")
    p.add_argument("--n-text-only", type=int, default=0, help="X-FM: captions of other scenes (text_only.json)")
    p.add_argument("--n-image-only", type=int, default=0, help="X-FM: uncaptioned images (image_only.json)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    files = generate_shapes_world(a.out, a.n_train, a.n_val, a.n_test, a.image_size, a.noise_fraction,
                                  a.seed, a.questions_per_image, a.shards,
                                  a.statements_per_image, a.nlvr_about, n_text_only=a.n_text_only,
                                  n_image_only=a.n_image_only)
    for name, path in sorted(files.items()):
        print(f"{name:16s} {path}")


if __name__ == "__main__":
    main()
