"""Image-text retrieval fine-tuning (COCO / Flickr30k Karpathy splits): ITC with the image-index queue + ITM on
hard negatives; ITC top-k + ITM re-rank recall on val and test after every epoch, the best val r_mean kept."""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..data.datasets import ImageDataset, as_list, load_entries
from ..data.tokenizer import pre_caption
from ..evaluation.loops import evaluate_retrieval
from ..data.batches import PairCollate
from ..data.negatives import HardNegatives, caption_sampler
from ..precision import PRECISIONS
from ..training.config import option
from .base import Task
from .caption import CaptionTrainDataset


class RetrievalTrainDataset(CaptionTrainDataset):
    """Same files and samples as caption training: (image, caption, idx)."""


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
            for caption in as_list(e["caption"]):
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


@dataclass
class RetrievalOptions(Task.Options):
    """Keys of the tasks that train ITC + ITM and evaluate retrieval (fine-tuning and pretraining)."""
    alpha: float = 0.4                  # the momentum distillation weight (ramped up)
    hard_negatives: dict | None = None  # NegCLIP: {captions: 3, images: 3} (blip.data.negatives)
    k_test: int = option(256, at_least=1)  # ITC candidates the ITM re-ranks
    rerank_precision: str = option("fp32", choices=PRECISIONS)  # the re-rank's: 'fp32' (the original), 'bf16', ...

    def __post_init__(self):
        HardNegatives.from_config(self.hard_negatives)  # a misspelled option is refused here, with its name


class RetrievalTask(Task):
    Options = RetrievalOptions
    names = ("retrieval",)
    model_task = "retrieval"
    ann_files = {"coco": "coco_karpathy_{}.json", "flickr": "flickr30k_{}.json", "shapes": "karpathy_{}.json"}

    def train_data(self, model):
        cfg = self.cfg
        return RetrievalTrainDataset(self.ann_file(cfg.dataset, "train"), cfg.image_root, self.train_transform(model),
                                     max_words=cfg.max_words)

    def begin_step(self, model, progress):
        model.momentum_update()

    def collate(self, model):
        return PairCollate(model.text_max_length, negatives=caption_sampler(self.options.hard_negatives),
                           static=self.static)

    def losses(self, forward, batch, progress):
        # the original: alpha ramps over the first epoch
        return forward(batch, alpha=self.options.alpha * min(1.0, progress.epochs_done))

    def evaluations(self, model, out_dir):
        cfg, opt, out = self.cfg, self.options, {}
        for split in ("val", "test"):
            gallery = RetrievalEvalDataset(self.ann_file(cfg.dataset, split), cfg.image_root,
                                           self.test_transform(model), max_words=cfg.max_words)
            out[split] = lambda m, g=gallery: evaluate_retrieval(
                m, g, k_test=opt.k_test, batch_size=cfg.test_batch_size, num_workers=cfg.num_workers,
                rerank_precision=opt.rerank_precision)
        return out

    def best(self, metrics):
        return metrics["val_r_mean"]
