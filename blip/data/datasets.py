"""Datasets for every BLIP task, reading the original annotation formats (SPEC §7).

Samples hold cleaned raw strings (pre_caption / pre_question); the model tokenises. Annotation files
are checked when a dataset is built: an entry without a required field raises ValueError naming the
file and the entry's index. An unreadable image is skipped: the dataset returns the next readable
sample, logs the path once and counts the skip in `num_skipped` (shared memory, so the count made in
DataLoader workers reaches the trainer); `bad_images` lists the paths seen by this process.
"""
from __future__ import annotations

import io
import itertools
import json
import logging
import os
import random
import re

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from .shards import (ShardOrderError, count_samples, expand_shards, is_remote, stream_samples,  # noqa: F401
                     tar_caption, tar_key_ext)
from .tokenizer import pre_caption, pre_question

log = logging.getLogger(__name__)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


# ---- annotation files ----

def _as_list(x):
    return [x] if isinstance(x, (str, os.PathLike)) else list(x)


def read_json(path):
    """json.load, with any error naming the file (and the line and column of a syntax error)."""
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8-sig"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {e.lineno} column {e.colno}: invalid JSON: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}): {e.reason}") from None


def load_entries(path, required=()) -> list[dict]:
    """A JSON list of dicts, each holding every `required` key, else ValueError naming the file and the line/column
    (a syntax error) or the entry's index."""
    entries = read_json(path)
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a JSON list of annotation entries, found a {type(entries).__name__}")
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            raise ValueError(f"{path}: entry {i} is a {type(e).__name__}, not an object with fields {list(required)}")
        missing = [k for k in required if k not in e]
        if missing:
            raise ValueError(f"{path}: entry {i} is missing required field(s) {missing}")
    return entries


def int_id(value) -> int:
    """An integer id: the value itself, or the last run of digits in a string
    ('val2014/COCO_val2014_000000391895.jpg' -> 391895, 'coco_57870' -> 57870)."""
    if isinstance(value, int):
        return value
    digits = re.findall(r"\d+", os.path.basename(str(value)))
    if not digits:
        raise ValueError(f"no integer id in {value!r}")
    return int(digits[-1])


# ---- image reading: one set of rules for training, evaluation, CapFilt and inference ----

class UnreadableImage(ValueError):
    """An image that is not read, with the reason."""


ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white, as img2dataset does


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any decoded PIL image -> 8-bit RGB, with the rules in README_DATA.md ("Image handling rules")."""
    mode = img.mode
    if mode in ("RGB",):
        return img
    if mode == "P" and "transparency" in img.info or mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, ALPHA_BACKGROUND)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    if mode.startswith("I;16") or mode == "I":  # 16-bit greyscale (PNG): scale 0..65535 to 0..255, not clip
        a = np.asarray(img).astype(np.float64)
        a = np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if mode == "F":
        return Image.fromarray(np.clip(np.rint(np.asarray(img)), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "CMYK" and img.info.get("icc_profile"):
        try:
            from PIL import ImageCms
            src = ImageCms.ImageCmsProfile(io.BytesIO(img.info["icc_profile"]))
            return ImageCms.profileToProfile(img, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except Exception:  # a broken profile: PIL's own CMYK -> RGB
            pass
    return img.convert("RGB")


def read_image(src, name=None) -> Image.Image:
    """Decode `src` (path or file object) fully into an 8-bit RGB PIL image, EXIF orientation applied, or raise
    UnreadableImage naming it: missing, empty, not an image, truncated, over PIL's decompression-bomb limit
    (Image.MAX_IMAGE_PIXELS; refused from 1x the limit, where PIL itself only warns), or a mode PIL cannot
    convert. Never a partly decoded or clipped picture."""
    import warnings
    from PIL import ImageFile, ImageOps
    name = name or str(src)
    truncated_ok = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file fails, even if another library set this
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(src) as img:
                img.load()
                img = ImageOps.exif_transpose(img)  # a no-op without an orientation tag
                return _to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UnreadableImage(f"{name}: over PIL's decompression-bomb limit of {Image.MAX_IMAGE_PIXELS} pixels "
                              f"({e})") from None
    except Exception as e:  # OSError (missing, empty, not an image, truncated), SyntaxError, ValueError, ...
        raise UnreadableImage(f"{name}: {type(e).__name__}: {e}") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = truncated_ok


def read_image_or_refuse(src, name=None) -> Image.Image:
    """read_image for a user's own file: its failure a plain ValueError, 'cannot read image NAME: reason'."""
    try:
        return read_image(src, name)
    except UnreadableImage as e:
        raise ValueError(f"cannot read image {e}") from None


class UnreadableEvalImages(RuntimeError):
    """An evaluation dataset met unreadable images: evaluation stops, naming every one."""


class NoReadableImage(RuntimeError):
    """A training dataset none of whose images can be read (a wrong image_root, most often)."""


NAMED_BAD_IMAGES = 10  # unreadable images named one by one in the log, per process; the rest are counted


class SkipsBadImages:
    """Mixin: `load_image` returns None for an unreadable image, after logging and counting it."""

    def _init_skips(self):
        self.bad_images: list[str] = []
        self._skipped = torch.zeros(1, dtype=torch.int64, device="cpu").share_memory_()
        self._recent: list[str] = []

    def take_skipped(self) -> list[str]:
        """Names of the images skipped (in this process) since the last call. The trainer calls it after every
        sample, in whichever worker made it, and carries the names to the main process with the batch."""
        out, self._recent = self._recent, []
        return out

    @property
    def num_skipped(self) -> int:
        """Samples skipped for an unreadable image, summed over every process using this dataset."""
        return int(self._skipped.item())

    def load_image(self, src, name=None):
        name = name or str(src)
        try:
            img = read_image(src, name)
        except UnreadableImage as e:
            self._skipped += 1
            self._recent.append(name)
            if name not in self.bad_images:
                self.bad_images.append(name)
                if len(self.bad_images) <= NAMED_BAD_IMAGES:
                    log.warning("skipping unreadable image %s", e)
                if len(self.bad_images) == NAMED_BAD_IMAGES:
                    log.warning("further unreadable images are counted, not named here (the epoch's data report "
                                "in metrics.jsonl lists them)")
            return None
        return self.transform(img) if self.transform is not None else img


class ImageFiles(Dataset):
    """Distinct (path, box) images, each through every transform given (one per image size needed): item i is
    (i, [tensors], None), or (i, None, why) for an unreadable image (the caller skips and names it)."""

    def __init__(self, keys, transforms):
        self.keys, self.transforms = keys, transforms

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, i):
        path, box = self.keys[i]
        try:
            img = read_image(path)
        except UnreadableImage as e:
            return i, None, str(e)
        if box is not None:
            x, y, w, h = box
            img = img.crop((x, y, x + w, y + h))
        return i, [t(img) for t in self.transforms], None


def collate_image_files(batch):
    """(readable indices, one stacked tensor per transform, [(index, why) unreadable])."""
    good = [b for b in batch if b[1] is not None]
    bad = [(b[0], b[2]) for b in batch if b[1] is None]
    if not good:
        return [], [], bad
    n = len(good[0][1])
    return [b[0] for b in good], [torch.stack([b[1][k] for b in good]) for k in range(n)], bad


class ImageDataset(SkipsBadImages, Dataset):
    """Map-style base: subclasses implement `load(index)`, returning None when an image is bad, and
    `image_files(index)`, the image paths of entry `index`.

    Training (`evaluation` False) returns the next readable sample instead of an unreadable one. Evaluation
    (`evaluation` True) never does — that would score another image under this entry's id — it stops with
    UnreadableEvalImages naming every unreadable image of the dataset (entry index and path), so the annotation
    file can be fixed and the scores stay comparable with everyone else's.
    """

    evaluation = False

    def __init__(self, transform):
        self.transform = transform
        self._init_skips()

    def image_files(self, index) -> list[str]:
        raise NotImplementedError

    def unreadable(self) -> list[tuple[int, str, str]]:
        """(entry index, path, reason) of every image of the dataset that cannot be read (decodes them all)."""
        out = []
        for i in range(len(self)):
            for path in self.image_files(i):
                try:
                    read_image(path)
                except UnreadableImage as e:
                    out.append((i, path, str(e)))
        return out

    def __getitem__(self, index):
        if self.evaluation:
            sample = self.load(index)
            if sample is None:
                bad = self.unreadable()
                listing = "\n".join(f"  entry {i}: {reason}" for i, _, reason in bad[:50])
                more = f"\n  ... and {len(bad) - 50} more" if len(bad) > 50 else ""
                raise UnreadableEvalImages(
                    f"{type(self).__name__} ({getattr(self, 'ann_file', '?')}): {len(bad)} of its images cannot be "
                    f"read. Evaluation stops rather than score a different set of images than the annotations "
                    f"name; fix or remove these entries:\n{listing}{more}")
            return sample
        n = len(self)
        for k in range(n):  # the next readable sample, wrapping around
            sample = self.load((index + k) % n)
            if sample is not None:
                return sample
        root = getattr(self, "image_root", None)
        where = f"under config key 'image_root' ({root!r})" if root else "at the paths its annotation files give"
        raise NoReadableImage(f"{type(self).__name__} ({getattr(self, 'ann_file', '?')}): no readable image in the "
                              f"dataset: all {len(self.bad_images)} tried are unreadable (first: "
                              f"{self.bad_images[0] if self.bad_images else '?'}); are the images {where}?")


# ---- pretraining ----

class PretrainDataset(ImageDataset):
    """JSON lists of {image, caption}; relative image paths are relative to their JSON file.
    Returns (image, caption)."""

    def __init__(self, ann_files, transform, max_words=30):
        super().__init__(transform)
        self.max_words = max_words
        self.ann = []
        for f in _as_list(ann_files):
            root = os.path.dirname(os.path.abspath(f))
            self.ann += [(os.path.join(root, e["image"]), e["caption"])
                         for e in load_entries(f, ("image", "caption"))]

    def __len__(self):
        return len(self.ann)

    def image_files(self, index):
        return [self.ann[index][0]]

    def load(self, index):
        path, caption = self.ann[index]
        image = self.load_image(path)
        return None if image is None else (image, pre_caption(caption, self.max_words))


class WebDatasetShards(SkipsBadImages, IterableDataset):
    """Pretraining pairs streamed from webdataset tar shards: KEY.jpg|png|webp + KEY.txt and/or KEY.json
    ({"caption": ...}), as img2dataset writes them. Yields (image, caption) like PretrainDataset.

    shards: a URL string or list (`::`, braces `{00000..01242}`, globs, `pipe:CMD`, http; see blip.data.shards).
    Per epoch (set_epoch), on reader r of R (rank x DataLoader worker), the pipeline is open_clip's:
      resampled=False: shard list -> shuffled with (seed, epoch), the same on every rank -> reader r takes shards
        r, r+R, ... (with fewer shards than readers every reader reads them all and keeps every R-th sample)
        -> tar -> shuffle buffer of `shuffle_buffer` samples seeded by (seed, epoch, r) -> decode.
      resampled=True: reader r draws shards with replacement, seeded by (seed, epoch, r) (an endless stream:
        the trainer stops after an epoch), then the same buffer and decode.
    shuffle=False reads in order, unshuffled. An epoch is `num_samples` samples (config train_num_samples) when
    given, else the samples counted once in the tar headers of local shards; `pipe:`/http shards need num_samples.
    Everything is seeded by (seed, epoch, reader), so a resumed epoch streams the same samples. A shard with
    non-adjacent sample members raises blip.data.shards.ShardOrderError naming it and the fix.
    """

    def __init__(self, shards, transform, *, max_words=30, shuffle=False, seed=0, rank=None, world_size=None,
                 num_samples=None, shuffle_buffer=1000, resampled=False):
        self.shards = expand_shards(shards)
        self.transform, self.max_words = transform, max_words
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        self.rank, self.world_size = rank, world_size
        self.num_samples, self.shuffle_buffer, self.resampled = num_samples, shuffle_buffer, resampled
        if num_samples is not None and num_samples <= 0:
            raise ValueError(f"num_samples (train_num_samples) must be positive, not {num_samples}")
        self._init_skips()

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        """Samples per epoch over all ranks: num_samples, or counted once from the tar headers (local shards)."""
        if self.num_samples is not None:
            return self.num_samples
        if not hasattr(self, "_len"):
            remote = [s for s in self.shards if is_remote(s)]
            if remote:
                raise ValueError(f"cannot size an epoch of streamed shards ({remote[0]}, ...) without reading them "
                                 f"all: set train_num_samples (the number of samples per epoch, as open_clip's "
                                 f"--train-num-samples; img2dataset's *_stats.json 'successes' sum to it)")
            self._len = sum(count_samples(s, IMAGE_EXTS) for s in self.shards)
        return self._len

    def _reader(self):
        dist = torch.distributed
        on = dist.is_available() and dist.is_initialized()
        rank = self.rank if self.rank is not None else (dist.get_rank() if on else 0)
        world = self.world_size if self.world_size is not None else (dist.get_world_size() if on else 1)
        info = get_worker_info()
        workers, wid = (info.num_workers, info.id) if info else (1, 0)
        return rank * workers + wid, world * workers

    def _rng(self, what, reader):
        return random.Random(f"{what}/{self.seed}/{self.epoch}/{reader}")  # str seeds: stable across processes

    def __iter__(self):
        reader, readers = self._reader()
        by_shard = True
        if self.resampled:
            rng = self._rng("resample", reader)
            urls = (rng.choice(self.shards) for _ in itertools.count())
        else:
            urls = list(self.shards)
            if self.shuffle:
                random.Random(self.seed + self.epoch).shuffle(urls)  # the same order on every rank
            by_shard = len(urls) >= readers
            if by_shard:
                urls = urls[reader::readers]
        samples = stream_samples(urls)
        if not by_shard:
            samples = itertools.islice(samples, reader, None, readers)
        if self.shuffle and self.shuffle_buffer > 1:
            from webdataset.filters import _shuffle
            samples = _shuffle(samples, self.shuffle_buffer, self.shuffle_buffer, rng=self._rng("buffer", reader))
        for shard, key, files in samples:
            sample = self._decode(shard, key, files)
            if sample is not None:
                yield sample

    def _decode(self, shard, key, files):
        name = f"{shard}:{key}"
        image_ext = next((e for e in IMAGE_EXTS if e in files), None)
        try:
            caption = tar_caption(files, name)
        except ValueError as e:
            log.warning("skipping %s: %s", name, e)
            return None
        if image_ext is None or caption is None:
            log.warning("skipping %s: no image or no caption (files: %s)", name, sorted(files))
            return None
        image = self.load_image(io.BytesIO(files[image_ext]), name)
        return None if image is None else (image, pre_caption(caption, self.max_words))


# ---- captioning and retrieval (COCO / Flickr30k Karpathy splits, NoCaps) ----

class CaptionTrainDataset(ImageDataset):
    """Karpathy train entries {image, caption, image_id} -> (image, caption, image index).

    The caption is cleaned but carries no prompt: the caption model prepends its own. Image ids are
    remapped to contiguous ints in order of first appearance (the retrieval idx queue needs them).
    """

    def __init__(self, ann_file, image_root, transform, max_words=30):
        super().__init__(transform)
        self.image_root, self.max_words = image_root, max_words
        self.ann = [e for f in _as_list(ann_file) for e in load_entries(f, ("image", "caption", "image_id"))]
        self.img_ids: dict = {}
        for e in self.ann:
            self.img_ids.setdefault(e["image_id"], len(self.img_ids))

    def __len__(self):
        return len(self.ann)

    def image_files(self, index):
        return [os.path.join(self.image_root, self.ann[index]["image"])]

    def load(self, index):
        e = self.ann[index]
        image = self.load_image(os.path.join(self.image_root, e["image"]))
        if image is None:
            return None
        return image, pre_caption(e["caption"], self.max_words), self.img_ids[e["image_id"]]


class RetrievalTrainDataset(CaptionTrainDataset):
    """Same files and samples as caption training: (image, caption, idx)."""


class CaptionEvalDataset(ImageDataset):
    """Entries {image, ...} -> (image, image_id). image_id is the entry's `image_id` or `img_id`
    (NoCaps) when present, else the integer ending the file name (COCO_val2014_000000391895.jpg)."""

    evaluation = True

    def __init__(self, ann_file, image_root, transform):
        super().__init__(transform)
        self.image_root, self.ann_file = image_root, ann_file
        self.ann = load_entries(ann_file, ("image",))
        self.image_ids = []
        for i, e in enumerate(self.ann):
            try:
                self.image_ids.append(int_id(e.get("image_id", e.get("img_id", e["image"]))))
            except ValueError as err:
                raise ValueError(f"{ann_file}: entry {i}: {err}") from None

    def __len__(self):
        return len(self.ann)

    def image_files(self, index):
        return [os.path.join(self.image_root, self.ann[index]["image"])]

    def load(self, index):
        image = self.load_image(os.path.join(self.image_root, self.ann[index]["image"]))
        return None if image is None else (image, self.image_ids[index])


NoCapsDataset = CaptionEvalDataset  # {image, img_id}


class RetrievalEvalDataset(ImageDataset):
    """Entries {image, caption: [str, ...]}. Exposes `.text` (every caption, flattened), `.image`,
    `.txt2img` {text index: image index}, `.img2txt` {image index: [text indices]};
    items are (image, image index)."""

    evaluation = True

    def __init__(self, ann_file, image_root, transform, max_words=30):
        super().__init__(transform)
        self.image_root, self.ann_file = image_root, ann_file
        self.ann = load_entries(ann_file, ("image", "caption"))
        self.text, self.image, self.txt2img, self.img2txt = [], [], {}, {}
        for img_id, e in enumerate(self.ann):
            self.image.append(e["image"])
            self.img2txt[img_id] = []
            for caption in _as_list(e["caption"]):
                self.img2txt[img_id].append(len(self.text))
                self.txt2img[len(self.text)] = img_id
                self.text.append(pre_caption(caption, max_words))

    def __len__(self):
        return len(self.ann)

    def image_files(self, index):
        return [os.path.join(self.image_root, self.image[index])]

    def load(self, index):
        image = self.load_image(os.path.join(self.image_root, self.image[index]))
        return None if image is None else (image, index)


# ---- VQA ----

def answer_weights(entry) -> tuple[list[str], list[float]]:
    """The original's weights: VQA = each distinct answer's share of the annotators (summed 1/n at a
    time, as the original does); Visual Genome = its one answer at 0.2."""
    if entry["dataset"] == "vg":
        return [entry["answer"]], [0.2]
    answers = _as_list(entry["answer"])
    weights: dict[str, float] = {}
    for a in answers:
        weights[a] = weights.get(a, 0.0) + 1 / len(answers)
    return list(weights), list(weights.values())


class VQADataset(ImageDataset):
    """split='train': entries {question, answer, image, dataset: 'vqa'|'vg'} ->
    (image, question, answers, weights). split='test': {question_id, question, image} ->
    (image, question, question_id). `image_root` is one folder or {'vqa': dir, 'vg': dir};
    `answer_list` (a JSON path or a list) becomes `.answer_list`, the candidates for rank inference."""

    def __init__(self, ann_files, image_root, transform, split="train", answer_list=None):
        super().__init__(transform)
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', not {split!r}")
        self.split, self.image_root, self.ann_file = split, image_root, ann_files
        self.evaluation = split == "test"
        required = ("image", "question", "answer", "dataset") if split == "train" else ("image", "question", "question_id")
        self.ann = []
        for f in _as_list(ann_files):
            entries = load_entries(f, required)
            for i, e in enumerate(entries):
                if split == "train" and e["dataset"] not in ("vqa", "vg"):
                    raise ValueError(f"{f}: entry {i} has dataset {e['dataset']!r}, expected 'vqa' or 'vg'")
            self.ann += entries
        if isinstance(answer_list, (str, os.PathLike)):
            path, answer_list = answer_list, read_json(answer_list)
            if not isinstance(answer_list, list) or not all(isinstance(a, str) for a in answer_list):
                bad = next((i for i, a in enumerate(answer_list) if not isinstance(a, str)), None) \
                    if isinstance(answer_list, list) else None
                raise ValueError(f"{path}: expected a JSON list of answer strings"
                                 + (f"; entry {bad} is not a string" if bad is not None else ""))
        self.answer_list = answer_list

    def __len__(self):
        return len(self.ann)

    def _root(self, e):
        return self.image_root[e.get("dataset", "vqa")] if isinstance(self.image_root, dict) else self.image_root

    def image_files(self, index):
        e = self.ann[index]
        return [os.path.join(self._root(e), e["image"])]

    def load(self, index):
        e = self.ann[index]
        image = self.load_image(os.path.join(self._root(e), e["image"]))
        if image is None:
            return None
        question = pre_question(e["question"])
        if self.split == "test":
            return image, question, e["question_id"]
        return (image, question, *answer_weights(e))


# ---- NLVR2 ----

def swap_left_right(sentence: str) -> str:
    """Swap the whole words 'left' and 'right' (the original compares split words)."""
    swap = {"left": "right", "right": "left"}
    return " ".join(swap.get(w, w) for w in sentence.split(" "))


class NLVRDataset(ImageDataset):
    """Entries {images: [p0, p1], sentence, label: 'True'|'False'} -> (image0, image1, sentence, label).

    In training the two images trade places with probability 0.5 (Python's `random`, as the original)
    and 'left'/'right' trade in the sentence with them. Evaluation never swaps: the original swapped
    there too, which made its scores vary from run to run.
    """

    def __init__(self, ann_file, image_root, transform, train: bool, max_words=40):
        super().__init__(transform)
        self.image_root, self.train, self.max_words, self.ann_file = image_root, train, max_words, ann_file
        self.evaluation = not train
        self.ann = load_entries(ann_file, ("images", "sentence", "label"))
        for i, e in enumerate(self.ann):
            if len(e["images"]) != 2 or str(e["label"]) not in ("True", "False"):
                raise ValueError(f"{ann_file}: entry {i} needs two images and label 'True' or 'False'")

    def __len__(self):
        return len(self.ann)

    def image_files(self, index):
        return [os.path.join(self.image_root, p) for p in self.ann[index]["images"]]

    def load(self, index):
        e = self.ann[index]
        image0 = self.load_image(os.path.join(self.image_root, e["images"][0]))
        image1 = self.load_image(os.path.join(self.image_root, e["images"][1])) if image0 is not None else None
        if image1 is None:
            return None
        sentence = pre_caption(e["sentence"], self.max_words)
        label = int(str(e["label"]) == "True")
        if self.train and random.random() >= 0.5:
            image0, image1, sentence = image1, image0, swap_left_right(sentence)
        return image0, image1, sentence, label


# ---- SNLI-VE ----

VE_LABELS = {"contradiction": 0, "neutral": 1, "entailment": 2}  # ALBEF's ids


class VEDataset(ImageDataset):
    """ALBEF's SNLI-VE files: entries {image, sentence, label} -> (image, sentence, label id). `image` is a Flickr30k
    id without extension (`image_root/{image}.jpg`), or a path with its extension (kept as it is); the sentence is
    cleaned with pre_caption; labels entailment / neutral / contradiction -> 2 / 1 / 0."""

    def __init__(self, ann_file, image_root, transform, train: bool, max_words=30):
        super().__init__(transform)
        self.image_root, self.max_words, self.ann_file = image_root, max_words, ann_file
        self.evaluation = not train
        self.ann = load_entries(ann_file, ("image", "sentence", "label"))
        for i, e in enumerate(self.ann):
            if e["label"] not in VE_LABELS:
                raise ValueError(f"{ann_file}: entry {i} has label {e['label']!r}; expected one of {sorted(VE_LABELS)}")

    def __len__(self):
        return len(self.ann)

    def image_files(self, index):
        image = str(self.ann[index]["image"])
        has_ext = image.rsplit(".", 1)[-1].lower() in IMAGE_EXTS
        return [os.path.join(self.image_root, image if has_ext else f"{image}.jpg")]

    def load(self, index):
        e = self.ann[index]
        image = self.load_image(self.image_files(index)[0])
        if image is None:
            return None
        return image, pre_caption(e["sentence"], self.max_words), VE_LABELS[e["label"]]
