"""blip: BLIP (Bootstrapping Language-Image Pre-training) — models, training and evaluation.

Public API:
    load_model(task, checkpoint=None, **overrides)   task in pretrain, retrieval, itm, caption, vqa, nlvr
    from_transformers(hf_model) / to_transformers(model)
    image_transform(image_size, train=False), load_images(paths_or_pil, image_size)
    save_weights(model, path)
    init_from_files(model, vision=FILE, text=BERT_DIR)   the original's unimodal start (ImageNet ViT, BERT)
    blip.inference: caption / answer / itm / embed_images / search / classify over whole collections (yield rows)
    itm_gradcam(model, image, text, layer=None)   Grad-CAM: where each word is (blip.inference.explain: overlays, peaks)
"""
from __future__ import annotations


from . import inference, tasks  # noqa: F401  (tasks: each registers its config keys, blip.training.config.OPTIONS)
from .inference import capfilt  # noqa: F401  (and CapFilt's)
from .data.images import image_transform, load_images
from .inference.explain import itm_gradcam
from .models import PRESETS, TASKS, ModelConfig
from .models.checkpoint import CheckpointMismatchError, save_weights
from .models.factory import load_model, stored_description
from .models.pretrained import init_from_files
from .models.transformers_layout import (config_from_transformers, from_transformers, to_transformers,
                                         transformers_config)

__all__ = ["inference", "itm_gradcam", "load_model", "stored_description", "from_transformers", "to_transformers",
           "config_from_transformers", "transformers_config",
           "image_transform", "load_images", "save_weights", "init_from_files", "ModelConfig", "PRESETS", "TASKS",
           "CheckpointMismatchError"]
