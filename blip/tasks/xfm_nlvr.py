"""X-FM NLVR2 fine-tuning: is the sentence true of the image pair? The fusion encoder over (sentence, image0) and
(sentence, image1), the two [CLS] states concatenated -> a two-way classifier; accuracy on dev and test-P after every
epoch, the best dev epoch kept. Starts from an X-FM checkpoint (`pretrained`, pretrain_xfm.py's)."""
from __future__ import annotations

from ..data.batches import ClassCollate
from .nlvr import NLVRTask
from .xfm import XFMModel, XFMModelOptions


class XFMNLVRTask(XFMModel, NLVRTask):
    """The data and evaluations of BLIP's NLVR2 task, X-FM's model with a pair classifier."""
    Options = XFMModelOptions
    names = ("xfm_nlvr",)
    model_task = "xfm_nlvr"

    def collate(self, model):
        # X-FM's language encoder reads [CLS] first (BLIP's NLVR2 model: [ENC])
        return ClassCollate(model.text_max_length, static=self.static, first_token=None)

    def losses(self, forward, batch, progress):
        return forward(nlvr=batch)
