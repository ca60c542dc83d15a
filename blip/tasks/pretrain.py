"""Pretraining: ITC + ITM + LM on image-text pairs (JSON lists or webdataset shards), the original's warmup +
step-decay schedule; on the offline shapes world, held-out retrieval recall after every epoch."""
from __future__ import annotations

import io
import itertools
import logging
import os
import random
from dataclasses import dataclass

import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..data.datasets import IMAGE_EXTS, ImageDataset, SkipsBadImages, as_list, load_entries
from ..data.shards import count_samples, expand_shards, is_remote, stream_samples, tar_caption
from ..data.tokenizer import pre_caption
from .retrieval import RetrievalEvalDataset, RetrievalOptions
from ..evaluation.loops import evaluate_retrieval
from ..data.batches import PairCollate
from ..data.negatives import caption_sampler
from ..training.config import option
from .base import Task

log = logging.getLogger(__name__)


class PretrainDataset(ImageDataset):
    """JSON lists of {image, caption}; relative image paths are relative to their JSON file.
    Returns (image, caption)."""

    def __init__(self, ann_files, transform, max_words=30):
        super().__init__(transform)
        self.max_words = max_words
        self.ann = []
        for f in as_list(ann_files):
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


@dataclass
class PretrainOptions(RetrievalOptions):
    train_file: list[str] = option([])  # JSON lists of {image, caption}, or webdataset shards (globs, braces)
    laion_path: str = ""                # the original's key (its LAION shards); unused here: shards go in train_file
    train_num_samples: int | None = None  # shards: samples per epoch (None: counted once), as open_clip's flag
    shard_shuffle_buffer: int = 1000    # shards: samples in the seeded shuffle buffer
    dataset_resampled: bool = False     # shards: draw shards with replacement (every rank the same steps)


class PretrainTask(Task):
    Options = PretrainOptions
    names = ("pretrain",)
    model_task = "pretrain"
    required_keys = ("train_file",)  # JSON lists or shards of pairs
    schedule = "step"
    crop_scale = (0.2, 1.0)  # pretraining crops down to 20%

    def train_data(self, model):
        cfg, opt, transform = self.cfg, self.options, self.train_transform(model)
        if any(".tar" in str(f) for f in opt.train_file):  # webdataset shards: globs, braces, pipe: URLs
            return WebDatasetShards(opt.train_file, transform, max_words=cfg.max_words, shuffle=True, seed=cfg.seed,
                                    num_samples=opt.train_num_samples, shuffle_buffer=opt.shard_shuffle_buffer,
                                    resampled=opt.dataset_resampled)
        return PretrainDataset(opt.train_file, transform, max_words=cfg.max_words)

    def begin_step(self, model, progress):
        model.momentum_update()

    def collate(self, model):
        return PairCollate(model.text_max_length, negatives=caption_sampler(self.options.hard_negatives), lm=True,
                           static=self.static)

    def losses(self, forward, batch, progress):
        # the original: alpha · min(1, (epoch · n + i) / (2n)), a ramp over the first two epochs
        return forward(batch, alpha=self.options.alpha * min(1.0, progress.epochs_done / 2))

    def evaluations(self, model, out_dir):
        if not self.cfg.shapes:
            return {}
        root = self.cfg.shapes["out_dir"]
        gallery = RetrievalEvalDataset(os.path.join(root, "karpathy_test.json"), root, self.test_transform(model))
        return {"": lambda m: evaluate_retrieval(m, gallery, k_test=self.options.k_test,
                                                 batch_size=self.cfg.test_batch_size,
                                                 rerank_precision=self.options.rerank_precision)}
