"""X-FM pretraining (Zhang et al. 2023): one model, three data streams in every optimizer step — image-text pairs
(ITC, ITM, image-conditioned MLM, MIM), text only (MLM on the language encoder) and images only (MIM). Each stream is
optional (`train_file`, `text_file`, `image_file`); the first given is the primary, whose length makes the epoch
(blip.data.samplers.Streams). On the offline shapes world, held-out ITC retrieval recall after every epoch."""
from __future__ import annotations

import os
import random
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from ..data.batches import MaskedImageBatch, MaskedPairBatch, MaskedTextBatch, texts
from ..data.datasets import ImageDataset, as_list, load_entries
from ..data.tokenizer import pre_caption
from ..evaluation.loops import eval_mode, feature_spread
from ..evaluation.metrics import retrieval_recall
from ..models.factory import load_model
from ..models.xfm import block_mask, mlm_mask, mlm_positions, wordpiece_word_ids
from ..training.config import option
from .base import Task
from .pretrain import PretrainDataset
from .retrieval import RetrievalEvalDataset


class TextOnlyDataset(Dataset):
    """Texts without images: JSON lists of {caption} (or {text}), or text files of one text a line. Returns the
    cleaned text."""

    def __init__(self, files, max_words=30):
        self.texts, self.max_words = [], max_words
        for f in as_list(files):
            if not str(f).endswith(".json"):
                self.texts += [line for line in open(f, encoding="utf-8").read().splitlines() if line.strip()]
                continue
            for i, entry in enumerate(load_entries(f)):
                text = entry.get("caption", entry.get("text"))
                if not isinstance(text, str):
                    raise ValueError(f"{f}: entry {i} has no 'caption' (or 'text') string")
                self.texts.append(text)

    def __len__(self):
        return len(self.texts)

    def __getitem__(self, i):
        return pre_caption(self.texts[i], self.max_words)


class ImageOnlyDataset(ImageDataset):
    """Images without captions: JSON lists of {image}; relative paths are relative to their JSON file. Returns the
    transformed image (an unreadable one is skipped and counted, as in every training set)."""

    def __init__(self, files, transform):
        super().__init__(transform)
        self.paths = []
        for f in as_list(files):
            root = os.path.dirname(os.path.abspath(f))
            self.paths += [os.path.join(root, e["image"]) for e in load_entries(f, ("image",))]

    def __len__(self):
        return len(self.paths)

    def image_files(self, index):
        return [self.paths[index]]

    def load(self, index):
        return self.load_image(self.paths[index])


class XFMCollate:
    """One stream's samples -> its batch, the masks drawn here on the host: whole-word MLM over WordPiece words
    (mlm_mask), BEiT block masks over the patch grid (block_mask). The draws come from a generator seeded by the
    batch's first sample seed (the engine's (seed, epoch, index)), so any worker and a resumed run draw the same.
    Streams: 'pairs' (image, caption) -> MaskedPairBatch, 'text' caption -> MaskedTextBatch, 'images' image ->
    MaskedImageBatch."""
    seeded = True

    def __init__(self, stream: str, model, *, mlm_prob: float = 0.15, static: bool = False):
        self.stream, self.cfg, self.max_length = stream, model.cfg, model.text_max_length
        self.mlm_prob, self.static = mlm_prob, static

    def masked_texts(self, strings, generator):
        ids, mask = texts(strings, self.max_length, static=self.static)
        mlm_ids, labels = mlm_mask(ids, wordpiece_word_ids(ids), prob=self.mlm_prob, vocab_size=self.cfg.vocab_size,
                                   generator=generator)
        # a static batch lists every position (its shapes stay fixed; the untaken ones weigh nothing)
        positions = torch.arange(labels.numel(), device="cpu") if self.static else mlm_positions(labels)
        return ids, mask, mlm_ids, labels, positions

    def patch_masks(self, n, generator):
        grid = self.cfg.grid
        return torch.stack([block_mask(grid, grid, self.cfg.num_masked_patches, generator).flatten()
                            for _ in range(n)])

    def __call__(self, samples, seeds):
        generator = torch.Generator(device="cpu").manual_seed(random.Random(f"masks:{seeds[0]}").getrandbits(63))
        if self.stream == "text":
            return MaskedTextBatch(*self.masked_texts(samples, generator))
        if self.stream == "images":
            return MaskedImageBatch(torch.stack(samples), self.patch_masks(len(samples), generator))
        ids, mask, mlm_ids, labels, positions = self.masked_texts([s[1] for s in samples], generator)
        return MaskedPairBatch(torch.stack([s[0] for s in samples]), ids, mask, mlm_ids, labels,
                               self.patch_masks(len(samples), generator), positions)


@torch.no_grad()
def itc_retrieval(model, gallery, batch_size=64, num_workers=0) -> dict:
    """Recall@1/5/10 both ways by ITC similarity alone (X-FM's retrieval without the ITM re-rank), and the
    features' spread. Every rank scores the whole gallery (the shapes world's is small)."""
    device = next(model.parameters()).device
    with eval_mode(model):
        image_feat = torch.cat([model.image_feat(model.encode_image(images.to(device)))
                                for images, _ in DataLoader(gallery, batch_size=batch_size, num_workers=num_workers)])
        text_feat = []
        for k in range(0, len(gallery.text), batch_size):
            ids, mask = texts(gallery.text[k:k + batch_size], model.text_max_length)
            text_feat.append(model.text_feat(model.encode_text(ids.to(device), mask.to(device))))
        text_feat = torch.cat(text_feat)
    sim = image_feat @ text_feat.t()
    return {**retrieval_recall(sim, sim.t(), gallery.txt2img, gallery.img2txt), **feature_spread(image_feat, text_feat)}


@dataclass
class XFMModelOptions(Task.Options):
    """What every X-FM task's config has: the model's own keys."""
    xfm: dict | None = None             # XFMConfig keys over the `preset` or the checkpoint's (blip.models.xfm)


class XFMModel:
    """Mixed in by every X-FM task (first, so it wins): the model built from the config's `pretrained` checkpoint
    (else a fresh X-FM at its `preset`), `model_keys()` and the config's `xfm` keys over its description (and the
    model keys both share: image_size, patch_size, vision_width, embed_dim, drop_path_rate)."""
    model_task = "xfm"
    find_unused_parameters = True  # a fine-tune leaves pretraining's heads (MLM, the mask token, ...) without gradients

    def model_keys(self) -> dict:
        return {}

    def build_model(self):
        return load_model(self.model_task, self.cfg.pretrained or None,
                          **{**self.cfg.model, **self.model_keys(), **(self.options.xfm or {})})

    def begin_step(self, model, progress):
        """No momentum encoders."""


@dataclass
class XFMOptions(XFMModelOptions):
    train_file: list[str] = option([])  # the pairs stream: JSON lists of {image, caption}
    text_file: list[str] = option([])   # the text stream: JSON lists of {caption} (or {text}), or .txt files
    image_file: list[str] = option([])  # the image stream: JSON lists of {image}
    batch_size_streams: dict | None = None  # per GPU, per stream ({text: 64}); a stream not named: batch_size_train

    def __post_init__(self):
        sizes = self.batch_size_streams or {}
        bad = {k: v for k, v in sizes.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1}
        if bad:
            raise ValueError(f"config key 'batch_size_streams': batch sizes are positive integers, got {bad}")


class XFMTask(XFMModel, Task):
    Options = XFMOptions
    names = ("xfm",)
    schedule = "step"        # BLIP pretraining's warmup + step decay (SPEC §12 does not give X-FM's)
    crop_scale = (0.2, 1.0)  # pretraining crops down to 20%, as BLIP's
    mlm_prob = 0.15          # the paper's (SPEC §12): 15% of a text's tokens, whole words

    def __init__(self, cfg):
        super().__init__(cfg)
        if not self.streams:
            raise ValueError("X-FM trains on at least one stream: config key 'train_file' (image-text pairs), "
                             "'text_file' (texts) or 'image_file' (images)")
        if cfg.init:
            raise ValueError("config key 'init' starts BLIP's towers; X-FM starts from random weights or a whole "
                             "X-FM checkpoint (`pretrained`)")
        self.stream_batch_sizes()  # a misspelled stream refused before anything is built

    @property
    def streams(self) -> list[str]:
        """The streams the config gives files for, in order: pairs, text, images."""
        opt = self.options
        files = {"pairs": opt.train_file, "text": opt.text_file, "images": opt.image_file}
        return [name for name, given in files.items() if given]

    def stream_batch_sizes(self) -> dict:
        """The config's batch_size_streams of the streams this run has (arm A keeps the config's sizes of the
        others); a name that is no X-FM stream is refused."""
        sizes = self.options.batch_size_streams or {}
        unknown = sorted(set(sizes) - {"pairs", "text", "images"})
        if unknown:
            raise ValueError(f"config key 'batch_size_streams': {unknown} are not X-FM streams (pairs, text, images)")
        return {name: b for name, b in sizes.items() if name in self.streams}

    @property
    def find_unused_parameters(self) -> bool:
        """Without one of its streams some heads get no gradient (arm A, pairs only: the language MLM head)."""
        return len(self.streams) < 3

    def train_data(self, model):
        cfg, opt = self.cfg, self.options
        read = {"pairs": lambda: PretrainDataset(opt.train_file, self.train_transform(model), max_words=cfg.max_words),
                "text": lambda: TextOnlyDataset(opt.text_file, max_words=cfg.max_words),
                "images": lambda: ImageOnlyDataset(opt.image_file, self.train_transform(model))}
        return {name: read[name]() for name in self.streams}

    def collate(self, model):
        return {name: XFMCollate(name, model, mlm_prob=self.mlm_prob, static=self.static) for name in self.streams}

    def losses(self, forward, batch, progress):
        return forward(**batch)

    def evaluations(self, model, out_dir):
        if not self.cfg.shapes:
            return {}
        root = self.cfg.shapes["out_dir"]
        gallery = RetrievalEvalDataset(os.path.join(root, "karpathy_test.json"), root, self.test_transform(model))
        return {"": lambda m: itc_retrieval(m, gallery, self.cfg.test_batch_size)}
