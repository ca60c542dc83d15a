"""X-FM NLVR2 fine-tuning: is the sentence true of the image pair? The fusion encoder over (sentence, image0) and
(sentence, image1), the two [CLS] states concatenated -> a two-way classifier; accuracy on dev and test-P after every
epoch, the best dev epoch kept. Starts from an X-FM checkpoint (`pretrained`, pretrain_xfm.py's)."""
from __future__ import annotations

from dataclasses import dataclass

from ..data.batches import ClassCollate
from ..models.factory import load_model
from .base import Task
from .nlvr import NLVRTask


@dataclass
class XFMNLVROptions(Task.Options):
    xfm: dict | None = None             # XFMConfig keys over the checkpoint's description (blip.models.xfm)


class XFMNLVRTask(NLVRTask):
    """The data and evaluations of BLIP's NLVR2 task, X-FM's model with a pair classifier."""
    Options = XFMNLVROptions
    names = ("xfm_nlvr",)
    model_task = "xfm_nlvr"
    find_unused_parameters = True  # pretraining's heads (ITC, ITM, MLM, the mask token) ride along unused

    def build_model(self):
        """The X-FM checkpoint of `pretrained` (else a fresh XFM at the config's `preset`), the config's `xfm` keys
        over its description."""
        return load_model(self.model_task, self.cfg.pretrained or None,
                          **{**self.cfg.model, **(self.options.xfm or {})})

    def collate(self, model):
        # X-FM's language encoder reads [CLS] first (BLIP's NLVR2 model: [ENC])
        return ClassCollate(model.text_max_length, static=self.static, first_token=None)

    def losses(self, forward, batch, progress):
        return forward(nlvr=batch)
