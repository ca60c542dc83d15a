"""One class per task model; `TASKS` maps the task name to it (a plain dict: no registry magic)."""
from .base import PRESETS, BlipModel, ModelConfig
from .caption import BlipCaption
from .nlvr import BlipNLVR
from .retrieval import BlipITM, BlipPretrain, BlipRetrieval
from .ve import BlipVE
from .vqa import BlipVQA
from .xfm import XFM
from .xfm_heads import XFMNLVR, XFMVQA

TASKS = {"pretrain": BlipPretrain, "retrieval": BlipRetrieval, "itm": BlipITM, "caption": BlipCaption,
         "vqa": BlipVQA, "nlvr": BlipNLVR, "ve": BlipVE, "xfm": XFM,
         "xfm_vqa": XFMVQA, "xfm_nlvr": XFMNLVR}

__all__ = ["PRESETS", "TASKS", "BlipModel", "ModelConfig", "BlipCaption", "BlipNLVR", "BlipITM", "BlipPretrain",
           "BlipRetrieval", "BlipVE", "BlipVQA", "XFM", "XFMNLVR", "XFMVQA"]
