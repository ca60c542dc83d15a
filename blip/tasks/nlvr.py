"""NLVR2 fine-tuning: is the sentence true of the image pair? Accuracy on dev and test-P after every epoch, the best
dev epoch kept."""
from __future__ import annotations

import os
import random

from ..data.batches import ClassCollate
from ..data.datasets import ImageDataset, load_entries
from ..data.tokenizer import pre_caption
from ..evaluation.loops import evaluate_nlvr
from .base import Task


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


class NLVRTask(Task):
    names = ("nlvr",)
    model_task = "nlvr"
    ann_files = {"nlvr": "nlvr_{}.json"}

    def train_data(self, model):
        return NLVRDataset(self.ann_file("nlvr", "train"), self.cfg.image_root, self.train_transform(model), train=True)

    def collate(self, model):
        return ClassCollate(model.text_static_length if self.static else model.text_max_length, static=self.static)

    def losses(self, forward, batch, progress):
        return forward(batch)

    def evaluations(self, model, out_dir):
        cfg, out = self.cfg, {}
        for split in ("dev", "test"):
            data = NLVRDataset(self.ann_file("nlvr", split), cfg.image_root, self.test_transform(model), train=False)
            out[split] = lambda m, d=data: evaluate_nlvr(m, d, cfg.test_batch_size, cfg.num_workers)
        return out

    def best(self, metrics):
        return metrics["dev_acc"]
