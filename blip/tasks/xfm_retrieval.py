"""X-FM retrieval fine-tuning (COCO / Flickr30k Karpathy splits, or any dataset of that format): ITC with the
captions of one image as positives + ITM on hard negatives over the fusion encoder, every encoder learning; the
retrieval protocol of BLIP's models (ITC top-k, ITM re-rank, recall@1/5/10) on val and test after every epoch, the
best val r_mean kept. Starts from an X-FM checkpoint (`pretrained`, pretrain_xfm.py's)."""
from __future__ import annotations

from dataclasses import dataclass

from ..data.batches import PairCollate
from ..precision import PRECISIONS
from ..training.config import option
from .retrieval import RetrievalTask
from .xfm import XFMModel, XFMModelOptions


@dataclass
class XFMRetrievalOptions(XFMModelOptions):
    k_test: int = option(256, at_least=1)  # ITC candidates the ITM re-ranks
    rerank_precision: str = option("fp32", choices=PRECISIONS)


class XFMRetrievalTask(XFMModel, RetrievalTask):
    """The data and evaluations of BLIP's retrieval task, X-FM's model and objectives."""
    Options = XFMRetrievalOptions
    names = ("xfm_retrieval",)

    def collate(self, model):
        return PairCollate(model.text_max_length, static=self.static)

    def losses(self, forward, batch, progress):
        return forward(retrieval=batch)
