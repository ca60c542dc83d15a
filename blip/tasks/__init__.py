"""One file per task: pretrain, retrieval, caption (+ NoCaps), vqa, nlvr, ve, xfm (X-FM). See base.Task for what a
task says; every task file in this folder is imported, registering its config keys."""
import importlib
import pkgutil

from .base import Task
from .caption import CaptionTask
from .nlvr import NLVRTask
from .pretrain import PretrainTask
from .retrieval import RetrievalTask
from .ve import VETask
from .vqa import VQATask
from .xfm import XFMTask

__all__ = ["Task", "PretrainTask", "RetrievalTask", "CaptionTask", "VQATask", "NLVRTask", "VETask", "XFMTask"]

# Each task file registers its config keys when it is imported (blip.training.config.OPTIONS): all are imported here,
# so a config of any task in this folder loads after `import blip`, and a new task file needs no line in this one.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
