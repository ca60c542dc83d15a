"""One file per task: pretrain, retrieval, caption (+ NoCaps), vqa, nlvr, ve, xfm (X-FM). See base.Task for what a
task says."""
from .base import Task
from .caption import CaptionTask
from .nlvr import NLVRTask
from .pretrain import PretrainTask
from .retrieval import RetrievalTask
from .ve import VETask
from .vqa import VQATask
from .xfm import XFMTask

__all__ = ["Task", "PretrainTask", "RetrievalTask", "CaptionTask", "VQATask", "NLVRTask", "VETask", "XFMTask"]
