"""Pretraining: ITC + ITM + LM on image-text pairs (JSON lists or webdataset shards), the original's warmup +
step-decay schedule; on the offline shapes world, held-out retrieval recall after every epoch."""
from __future__ import annotations

import os

from ..data.datasets import PretrainDataset, RetrievalEvalDataset, WebDatasetShards
from ..evaluation.loops import evaluate_retrieval
from ..data.batches import PairCollate
from ..data.negatives import caption_sampler
from .base import Task


class PretrainTask(Task):
    names = ("pretrain",)
    model_task = "pretrain"
    takes_hard_negatives = True
    required_keys = ("train_file",)  # JSON lists or shards of pairs
    schedule = "step"
    crop_scale = (0.2, 1.0)  # pretraining crops down to 20%

    def train_data(self, model):
        cfg, transform = self.cfg, self.train_transform(model)
        if any(".tar" in str(f) for f in cfg.train_file):  # webdataset shards: globs, braces, pipe: URLs
            return WebDatasetShards(cfg.train_file, transform, max_words=cfg.max_words, shuffle=True, seed=cfg.seed,
                                    num_samples=cfg.train_num_samples, shuffle_buffer=cfg.shard_shuffle_buffer,
                                    resampled=cfg.dataset_resampled)
        return PretrainDataset(cfg.train_file, transform, max_words=cfg.max_words)

    def begin_step(self, model, progress):
        model.momentum_update()

    def collate(self, model):
        return PairCollate(model.text_max_length, negatives=caption_sampler(self.cfg.hard_negatives), lm=True,
                           static=self.static)

    def losses(self, forward, batch, progress):
        # the original: alpha · min(1, (epoch · n + i) / (2n)), a ramp over the first two epochs
        return forward(batch, alpha=self.cfg.alpha * min(1.0, progress.epochs_done / 2))

    def evaluations(self, model, out_dir):
        if not self.cfg.shapes:
            return {}
        root = self.cfg.shapes["out_dir"]
        gallery = RetrievalEvalDataset(os.path.join(root, "karpathy_test.json"), root, self.test_transform(model))
        return {"": lambda m: evaluate_retrieval(m, gallery, k_test=self.cfg.k_test,
                                                 batch_size=self.cfg.test_batch_size,
                                                 rerank_precision=self.cfg.rerank_precision)}
