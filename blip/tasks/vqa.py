"""VQA fine-tuning on VQA v2 train+val and Visual Genome QA; after the last epoch the test questions are answered by
ranking the answer list (inference: rank, k_test candidates) or by generation, into vqa_result.json (the VQA
server's format). Splits that carry answers (the shapes world's) also get the official VQA accuracy."""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..data.batches import VQACollate
from ..data.datasets import ImageDataset, as_list, load_entries, read_json
from ..data.tokenizer import pre_question
from ..evaluation.loops import evaluate_vqa
from ..training.config import option
from .base import Task


def answer_weights(entry) -> tuple[list[str], list[float]]:
    """The original's weights: VQA = each distinct answer's share of the annotators (summed 1/n at a
    time, as the original does); Visual Genome = its one answer at 0.2."""
    if entry["dataset"] == "vg":
        return [entry["answer"]], [0.2]
    answers = as_list(entry["answer"])
    weights: dict[str, float] = {}
    for a in answers:
        weights[a] = weights.get(a, 0.0) + 1 / len(answers)
    return list(weights), list(weights.values())


def read_answer_list(path) -> list[str]:
    """An answer list file (answer_list.json: a JSON list of answer strings)."""
    answer_list = read_json(path)
    if not isinstance(answer_list, list) or not all(isinstance(a, str) for a in answer_list):
        bad = next((i for i, a in enumerate(answer_list) if not isinstance(a, str)), None) \
            if isinstance(answer_list, list) else None
        raise ValueError(f"{path}: expected a JSON list of answer strings"
                         + (f"; entry {bad} is not a string" if bad is not None else ""))
    return answer_list


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
        for f in as_list(ann_files):
            entries = load_entries(f, required)
            for i, e in enumerate(entries):
                if split == "train" and e["dataset"] not in ("vqa", "vg"):
                    raise ValueError(f"{f}: entry {i} has dataset {e['dataset']!r}, expected 'vqa' or 'vg'")
            self.ann += entries
        if isinstance(answer_list, (str, os.PathLike)):
            answer_list = read_answer_list(answer_list)
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


@dataclass
class VQAOptions(Task.Options):
    train_files: list[str] = option([])  # annotation files under ann_root, without .json: vqa_train, vqa_val, vg_qa
    vqa_root: str = option("", path="folder")  # the COCO images of VQA v2
    vg_root: str = option("", path="folder")  # the Visual Genome images
    inference: str = option("rank", choices=("rank", "generate"))  # test answers: rank the answer list, or generate
    k_test: int = option(128, at_least=1)  # 'rank': answers whose first token is in the top k are scored in full


class VQATask(Task):
    Options = VQAOptions
    names = ("vqa",)
    model_task = "vqa"
    eval_every_epoch = False  # as the original: no model selection on the test split, evaluated once
    ann_files = {"vqa": "vqa_{}.json"}

    @property
    def roots(self):
        return {"vqa": self.options.vqa_root, "vg": self.options.vg_root}

    def train_data(self, model):
        cfg = self.cfg
        files = [os.path.join(cfg.ann_root, f"{name}.json") for name in self.options.train_files]
        return VQADataset(files, self.roots, self.train_transform(model), split="train")

    def collate(self, model):
        answers = model.answer_static_length if self.static else model.answer_max_length
        return VQACollate(model.question_max_length, answers, static=self.static)

    def losses(self, forward, batch, progress):
        return forward(batch)

    def answering(self) -> dict:
        """How the test questions are answered: evaluate_vqa's `method` and `k`."""
        return dict(method=self.options.inference, k=self.options.k_test)

    def evaluations(self, model, out_dir):
        cfg = self.cfg
        answer_list = read_answer_list(os.path.join(cfg.ann_root, "answer_list.json"))
        test = VQADataset(self.ann_file("vqa", "test"), self.roots, self.test_transform(model), split="test")
        return {"test": lambda m: evaluate_vqa(m, test, answer_list, os.path.join(out_dir, "vqa_result.json"),
                                               **self.answering(), batch_size=cfg.test_batch_size,
                                               num_workers=cfg.num_workers)}
