"""What every BLIP task model shares: sizes as data, the image encoder, momentum encoders and queues."""
from __future__ import annotations

from dataclasses import dataclass, fields, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbones import BackboneConfig, build_backbone, layer_ids
from ..data.batches import Batch
from .med import TextConfig
from ..data.tokenizer import VOCAB_SIZE, tokenize
from .vit import VIT_PRESETS, VisionConfig, build_vit


@dataclass
class ModelConfig:
    """Model sizes and options. `vit` picks a preset; the vision_* fields override it (custom sizes)."""
    vit: str = "base"
    image_size: int = 384
    patch_size: int = 16
    vision_width: int | None = None
    vision_depth: int | None = None
    vision_heads: int | None = None
    vision_layer_norm_eps: float = 1e-6
    vision_intermediate_size: int | None = None  # ViT MLP width; None: 4 × vision width
    drop_path_rate: float | None = None  # None: the original's rule for the task (see `vision`)
    vit_grad_ckpt: bool = False
    vit_ckpt_layer: int = 0
    med_config: dict | str | None = None  # BERT-style dict or JSON path; None = BERT-base (MED)
    text_grad_ckpt: bool = False
    embed_dim: int = 256
    queue_size: int = 57600
    momentum: float = 0.995
    negative_all_rank: bool = False
    prompt: str = "a picture of "
    # Another image encoder (blip/models/backbones.py): a timm model name; '' = BLIP's ViT (`vit` and the vision_* sizes)
    vision_backbone: str = ""
    vision_backbone_file: str = ""  # its weights: a local timm / open_clip / OpenAI file ('' = random init)
    vision_backbone_args: dict | None = None  # timm.create_model keyword arguments (sizes, output_stride, ...)
    vision_token_width: int | None = None  # a learned projection of the image tokens; None: the backbone's width
    freeze_vision: bool = False  # the image encoder stays as loaded (no gradients, eval mode); a backbone's added
    #                              grid position embedding and token projection still train
    freeze_vision_blocks: int = 0  # ... or its stem and first N blocks (timm's group_matcher layers)

    @classmethod
    def from_overrides(cls, stored: dict | None = None, **options) -> "ModelConfig":
        """The one model description: the defaults, then the `preset` (a name in PRESETS: the size a model has
        when no checkpoint describes one), then a checkpoint's `stored` description, then the user's own keys.
        `med_config` dicts merge key by key."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known - {"preset"})
        if unknown:
            raise TypeError(f"unknown model option(s) {unknown}; known: {sorted(known | {'preset'})}")
        preset = options.pop("preset", None)
        if preset is not None and preset not in PRESETS:
            raise ValueError(f"unknown model preset {preset!r}; choose from {sorted(PRESETS)}")
        merged: dict = {}
        # a checkpoint holds its backbone's weights: the file they were first read from is not read again
        stored = {k: v for k, v in (stored or {}).items() if k != "vision_backbone_file"}
        for layer in (PRESETS.get(preset, {}), stored, options):
            for k, v in layer.items():
                if k == "med_config" and isinstance(v, dict) and isinstance(merged.get(k), dict):
                    v = {**merged[k], **v}
                merged[k] = v
        return cls(**{k: v for k, v in merged.items() if k in known})

    def to_dict(self) -> dict:
        return asdict(self)

    def vision(self, base_drop_path: float = 0.0) -> VisionConfig | BackboneConfig:
        """The image encoder's description; `base_drop_path`: the model class's stochastic depth for a base ViT."""
        if self.vision_backbone:
            return BackboneConfig(name=self.vision_backbone, image_size=self.image_size, file=self.vision_backbone_file,
                                  kwargs=dict(self.vision_backbone_args or {}),
                                  drop_path_rate=self.drop_path_rate or 0.0, grad_ckpt=self.vit_grad_ckpt,
                                  token_width=self.vision_token_width)
        if self.vision_token_width is not None:
            raise ValueError("vision_token_width projects a vision_backbone's tokens; BLIP's ViT sets its width with "
                             "vision_width")
        if self.vit not in VIT_PRESETS:
            raise ValueError(f"vit must be one of {sorted(VIT_PRESETS)}, got {self.vit!r}")
        width, depth, heads = VIT_PRESETS[self.vit]
        dpr = self.drop_path_rate
        if dpr is None:  # original: ViT-L always 0.1; base: the model class's (0.1 for VQA and NLVR2)
            dpr = 0.1 if self.vit == "large" else base_drop_path
        return VisionConfig(image_size=self.image_size, patch_size=self.patch_size,
                            width=self.vision_width or width, depth=self.vision_depth or depth,
                            heads=self.vision_heads or heads, drop_path_rate=dpr, grad_ckpt=self.vit_grad_ckpt,
                            ckpt_layer=self.vit_ckpt_layer, layer_norm_eps=self.vision_layer_norm_eps,
                            intermediate_size=self.vision_intermediate_size)

    def text(self, **overrides) -> TextConfig:
        cfg = TextConfig.from_any(self.med_config, **overrides)
        # bert_config.json says 30522; the original resizes the embeddings to the tokenizer's 30524 ([DEC], [ENC])
        cfg.vocab_size = max(cfg.vocab_size, VOCAB_SIZE)
        return cfg


MODEL_KEYS = {f.name for f in fields(ModelConfig)} | {"preset"}  # what a run config may set on the model


# Named sizes (open_clip's model_configs, as data). `tiny` is the offline shapes world's model (every
# configs/shapes_*.yaml); `micro` the unit tests' smallest model.
PRESETS: dict[str, dict] = {
    "base": dict(vit="base"),
    "large": dict(vit="large"),
    "tiny": dict(image_size=32, patch_size=4, vision_width=64, vision_depth=2, vision_heads=2, embed_dim=32,
                 med_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256)),
    "micro": dict(image_size=32, patch_size=16, vision_width=24, vision_depth=1, vision_heads=2, embed_dim=8,
                  drop_path_rate=0.0,
                  med_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)),
}


class BlipModel(nn.Module):
    """Base: holds `visual_encoder` and the config; subclasses add their text stacks and heads."""
    task: str = ""
    # Checkpoint keys a model may start without (fresh heads when fine-tuning from another task).
    fresh_keys: tuple[str, ...] = ()
    vision_drop_path: float = 0.0  # the original's stochastic depth for a base ViT under this head (drop_path_rate None)
    # checkpoint key prefixes of cross-attention that reads text states, not the image (blip.models.checkpoint)
    text_context_cross_attention: tuple[str, ...] = ()
    starts_every_task: bool = False  # its checkpoints start every task (pretraining): loaded as another, no warning
    transformers_class: str | None = None  # transformers' BLIP class of the same layout, if it has one

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_cfg = cfg.vision(self.vision_drop_path)
        if isinstance(self.vision_cfg, BackboneConfig):
            self.visual_encoder = build_backbone(self.vision_cfg)  # sets vision_cfg.width: the tokens' width
        else:
            self.visual_encoder = build_vit(self.vision_cfg)
        for p in self.frozen_vision_params():
            p.requires_grad_(False)

    @property
    def device(self):
        return next(self.visual_encoder.parameters()).device

    def forward(self, *args, **kwargs):
        """What DDP and torch.compile call in training: a typed batch (blip.data.batches) -> `batch_losses`, the tensors a
        task's collate made; anything else -> `losses`, the same computation from strings (tokenized here)."""
        if args and isinstance(args[0], Batch):
            return self.batch_losses(*args, **kwargs)
        return self.losses(*args, **kwargs)

    def vision_layers(self) -> tuple[dict[str, int], int]:
        """({'visual_encoder.<name>': layer}, number of layers): stem 0, then one per block (blip.models.backbones)."""
        ids, n = layer_ids(self.visual_encoder)
        return {f"visual_encoder.{k}": v for k, v in ids.items()}, n

    def frozen_vision_params(self) -> list[nn.Parameter]:
        """The visual encoder's parameters that `freeze_vision` / `freeze_vision_blocks` keep as loaded."""
        if not (self.cfg.freeze_vision or self.cfg.freeze_vision_blocks):
            return []
        ids, n = self.vision_layers()
        last = n - 1 if self.cfg.freeze_vision else min(self.cfg.freeze_vision_blocks, n - 1)
        return [p for k, p in self.named_parameters() if k in ids and ids[k] <= last]

    def train(self, mode: bool = True):
        """Frozen vision layers stay in eval mode: no BatchNorm statistics move, no dropout or drop-path there."""
        super().train(mode)
        frozen = {id(p) for p in self.frozen_vision_params()} if mode else set()
        for m in self.visual_encoder.modules() if frozen else ():
            params = list(m.parameters())
            if params and all(id(p) in frozen for p in params):
                m.eval()
        return self

    def text_cfg(self, **overrides) -> TextConfig:
        return self.cfg.text(encoder_width=self.vision_cfg.width, **overrides)

    def tokenize(self, texts, **kw):
        return tokenize(texts, device=self.device, **kw)

    def set_text_grad_ckpt(self, on: bool = True):
        for m in self.modules():
            if hasattr(m, "gradient_checkpointing"):
                m.gradient_checkpointing = on


class MomentumMixin:
    """Momentum (EMA) copies and feature queues for ITC (written once for retrieval and pretraining).

    The training step calls `momentum_update()` before the loss (the original did it inside forward);
    `losses()` enqueues the momentum features it computed.
    """

    def _init_momentum(self, pairs: list[tuple[str, nn.Module]], queue_size: int, embed_dim: int, ptr_name: str):
        import copy
        self._momentum_names = [name for name, _ in pairs]
        for name, module in pairs:
            m = copy.deepcopy(module)
            for p in m.parameters():
                p.requires_grad_(False)
            setattr(self, name + "_m", m)
        self.register_buffer("image_queue", F.normalize(torch.randn(embed_dim, queue_size), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(embed_dim, queue_size), dim=0))
        self.register_buffer(ptr_name, torch.zeros(1, dtype=torch.long))
        self._ptr_name = ptr_name

    def _momentum_params(self):
        online, momentum = [], []
        for name in self._momentum_names:
            online += list(getattr(self, name).parameters())
            momentum += list(getattr(self, name + "_m").parameters())
        return online, momentum

    @torch.no_grad()
    def copy_params(self):
        for p, pm in zip(*self._momentum_params()):
            pm.copy_(p.detach())

    @torch.no_grad()
    def momentum_update(self):
        online, momentum = self._momentum_params()
        m = self.cfg.momentum
        torch._foreach_mul_(momentum, m)
        torch._foreach_add_(momentum, [p.detach() for p in online], alpha=1.0 - m)

    @torch.no_grad()
    def enqueue(self, image_feat, text_feat, idx=None):
        """Write the (all-rank) momentum features at the pointer; the queue length must divide evenly. The pointer
        stays on the device (columns indexed by a tensor, not sliced by a Python int): no host sync."""
        from ..distributed import all_gather_no_grad
        image_feat, text_feat = all_gather_no_grad(image_feat), all_gather_no_grad(text_feat)
        n, size = image_feat.shape[0], self.image_queue.shape[1]
        if size % n:
            raise ValueError(f"queue_size {size} is not divisible by the global batch size {n}")
        ptr_buf = getattr(self, self._ptr_name)
        cols = (ptr_buf + torch.arange(n, device=ptr_buf.device)) % size
        self.image_queue.index_copy_(1, cols, image_feat.T.to(self.image_queue.dtype))
        self.text_queue.index_copy_(1, cols, text_feat.T.to(self.text_queue.dtype))
        if idx is not None:
            self.idx_queue.index_copy_(1, cols, all_gather_no_grad(idx).view(1, -1))
        ptr_buf.copy_((ptr_buf + n) % size)
