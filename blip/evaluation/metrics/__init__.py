"""Evaluation metrics: retrieval recall, COCO caption scores, official VQA accuracy, accuracy."""
from .caption import caption_scores, load_coco_gt, spice_available
from .nlvr import accuracy
from .retrieval import retrieval_recall
from .vqa import normalize_answer, question_accuracy, vqa_accuracy

__all__ = ["accuracy", "caption_scores", "load_coco_gt", "normalize_answer", "question_accuracy",
           "retrieval_recall", "spice_available", "vqa_accuracy"]
