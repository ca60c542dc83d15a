"""Datasets for every BLIP task, reading the original annotation formats (SPEC §7).

Samples hold cleaned raw strings (pre_caption / pre_question); the model tokenises. Annotation files
are checked when a dataset is built: an entry without a required field raises ValueError naming the
file and the entry's index. An unreadable image is skipped: the dataset returns the next readable
sample, logs the path once and counts the skip in `num_skipped` (shared memory, so the count made in
DataLoader workers reaches the trainer); `bad_images` lists the paths seen by this process.
"""
from __future__ import annotations

import glob
import io
import json
import logging
import os
import random
import re
import tarfile

import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from .tokenizer import pre_caption, pre_question

log = logging.getLogger(__name__)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


# ---- annotation files ----

def _as_list(x):
    return [x] if isinstance(x, (str, os.PathLike)) else list(x)


def load_entries(path, required=()) -> list[dict]:
    """A JSON list of dicts, each holding every `required` key, else ValueError(file, index)."""
    with open(path) as f:
        entries = json.load(f)
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a JSON list of annotation entries")
    for i, e in enumerate(entries):
        missing = [k for k in required if k not in e] if isinstance(e, dict) else list(required)
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


# ---- image loading with skip-and-count ----

class SkipsBadImages:
    """Mixin: `load_image` returns None for an unreadable image, after logging and counting it."""

    def _init_skips(self):
        self.bad_images: list[str] = []
        self._skipped = torch.zeros(1, dtype=torch.int64).share_memory_()
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
            with Image.open(src) as img:
                img = img.convert("RGB")  # decodes now, so a truncated file fails here
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            self._skipped += 1
            self._recent.append(name)
            if name not in self.bad_images:
                self.bad_images.append(name)
                log.warning("skipping unreadable image %s (%s: %s)", name, type(e).__name__, e)
            return None
        return self.transform(img) if self.transform is not None else img


class ImageDataset(SkipsBadImages, Dataset):
    """Map-style base: subclasses implement `load(index)`, returning None when an image is bad."""

    def __init__(self, transform):
        self.transform = transform
        self._init_skips()

    def __getitem__(self, index):
        n = len(self)
        for k in range(n):  # the next readable sample, wrapping around
            sample = self.load((index + k) % n)
            if sample is not None:
                return sample
        raise RuntimeError(f"{type(self).__name__}: no readable image in the dataset")


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

    def load(self, index):
        path, caption = self.ann[index]
        image = self.load_image(path)
        return None if image is None else (image, pre_caption(caption, self.max_words))


def tar_key_ext(member_name: str) -> tuple[str, str]:
    """'dir/000123.jpg' -> ('dir/000123', 'jpg'): a sample's key is its path up to the first dot of the name."""
    folder, name = os.path.split(member_name)
    stem, _, ext = name.partition(".")
    return os.path.join(folder, stem), ext.lower()


def _tar_samples(path):
    """Yield (key, {ext: bytes}) from a webdataset-style tar: consecutive files sharing a key
    (the path up to the first dot of the file name) form one sample."""
    key, files = None, {}
    with tarfile.open(path) as tar:
        for m in tar:
            if not m.isfile():
                continue
            k, ext = tar_key_ext(m.name)
            if k != key:
                if files:
                    yield key, files
                key, files = k, {}
            files[ext] = tar.extractfile(m).read()
    if files:
        yield key, files


def tar_caption(files: dict):
    """A webdataset sample's caption: KEY.txt, or the 'caption' (or 'text') of KEY.json; None if neither."""
    if "txt" in files:
        return files["txt"].decode("utf-8")
    if "json" in files:
        meta = json.loads(files["json"])
        return meta.get("caption", meta.get("text"))
    return None


class WebDatasetShards(SkipsBadImages, IterableDataset):
    """Pretraining pairs from .tar shards holding KEY.jpg|png + KEY.txt|json ({"caption": ...}).

    Split over (rank, worker): whole shards when there are at least as many shards as readers,
    otherwise every reader reads all shards and keeps every n-th sample. Yields (image, caption).
    `set_epoch` reshuffles the shard order (when shuffle=True) identically on every rank.
    """

    def __init__(self, shards, transform, max_words=30, shuffle=False, seed=0, rank=None, world_size=None):
        self.shards = [p for s in _as_list(shards) for p in (sorted(glob.glob(str(s))) or [str(s)])]
        self.transform, self.max_words = transform, max_words
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        self.rank, self.world_size = rank, world_size
        self._init_skips()

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        """Samples in all shards (tar headers only; counted once): sizes an epoch for the trainer."""
        if not hasattr(self, "_len"):
            keys = set()
            for shard in self.shards:
                with tarfile.open(shard) as tar:
                    keys.update((shard, m.name.split(".", 1)[0]) for m in tar if m.isfile())
            self._len = len(keys)
        return self._len

    def _reader(self):
        dist = torch.distributed
        on = dist.is_available() and dist.is_initialized()
        rank = self.rank if self.rank is not None else (dist.get_rank() if on else 0)
        world = self.world_size if self.world_size is not None else (dist.get_world_size() if on else 1)
        info = get_worker_info()
        workers, wid = (info.num_workers, info.id) if info else (1, 0)
        return rank * workers + wid, world * workers

    def __iter__(self):
        reader, readers = self._reader()
        shards = list(self.shards)
        if self.shuffle:
            random.Random(self.seed + self.epoch).shuffle(shards)
        by_shard = len(shards) >= readers
        if by_shard:
            shards = shards[reader::readers]
        k = -1
        for shard in shards:
            for key, files in _tar_samples(shard):
                k += 1
                if not by_shard and k % readers != reader:
                    continue
                sample = self._decode(shard, key, files)
                if sample is not None:
                    yield sample

    def _decode(self, shard, key, files):
        name = f"{shard}:{key}"
        image_ext = next((e for e in IMAGE_EXTS if e in files), None)
        caption = tar_caption(files)
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

    def __init__(self, ann_file, image_root, transform):
        super().__init__(transform)
        self.image_root = image_root
        self.ann = load_entries(ann_file, ("image",))
        self.image_ids = []
        for i, e in enumerate(self.ann):
            try:
                self.image_ids.append(int_id(e.get("image_id", e.get("img_id", e["image"]))))
            except ValueError as err:
                raise ValueError(f"{ann_file}: entry {i}: {err}") from None

    def __len__(self):
        return len(self.ann)

    def load(self, index):
        image = self.load_image(os.path.join(self.image_root, self.ann[index]["image"]))
        return None if image is None else (image, self.image_ids[index])


NoCapsDataset = CaptionEvalDataset  # {image, img_id}


class RetrievalEvalDataset(ImageDataset):
    """Entries {image, caption: [str, ...]}. Exposes `.text` (every caption, flattened), `.image`,
    `.txt2img` {text index: image index}, `.img2txt` {image index: [text indices]};
    items are (image, image index)."""

    def __init__(self, ann_file, image_root, transform, max_words=30):
        super().__init__(transform)
        self.image_root = image_root
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
        self.split, self.image_root = split, image_root
        required = ("image", "question", "answer", "dataset") if split == "train" else ("image", "question", "question_id")
        self.ann = []
        for f in _as_list(ann_files):
            entries = load_entries(f, required)
            for i, e in enumerate(entries):
                if split == "train" and e["dataset"] not in ("vqa", "vg"):
                    raise ValueError(f"{f}: entry {i} has dataset {e['dataset']!r}, expected 'vqa' or 'vg'")
            self.ann += entries
        if isinstance(answer_list, (str, os.PathLike)):
            with open(answer_list) as fh:
                answer_list = json.load(fh)
        self.answer_list = answer_list

    def __len__(self):
        return len(self.ann)

    def _root(self, e):
        return self.image_root[e.get("dataset", "vqa")] if isinstance(self.image_root, dict) else self.image_root

    def load(self, index):
        e = self.ann[index]
        image = self.load_image(os.path.join(self._root(e), e["image"]))
        if image is None:
            return None
        question = pre_question(e["question"])
        if self.split == "test":
            return image, question, e["question_id"]
        return (image, question, *answer_weights(e))


def vqa_collate(batch):
    """-> (images [B,3,H,W], questions, answers flattened, weights tensor, n answers per question)."""
    images, questions, answers, weights, n = [], [], [], [], []
    for image, question, ans, w in batch:
        images.append(image)
        questions.append(question)
        answers += ans
        weights += w
        n.append(len(ans))
    return torch.stack(images), questions, answers, torch.tensor(weights, dtype=torch.float32), n


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
        self.image_root, self.train, self.max_words = image_root, train, max_words
        self.ann = load_entries(ann_file, ("images", "sentence", "label"))
        for i, e in enumerate(self.ann):
            if len(e["images"]) != 2 or str(e["label"]) not in ("True", "False"):
                raise ValueError(f"{ann_file}: entry {i} needs two images and label 'True' or 'False'")

    def __len__(self):
        return len(self.ann)

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
