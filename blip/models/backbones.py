"""Any timm image model as BLIP's visual encoder (CLIP-ViL: CLIP ResNet grids or CLIP ViT tokens under the text stack).

    vision_backbone: vit_base_patch16_clip_224          # a timm model name
    vision_backbone_file: ckpt/clip_vit_b16.safetensors  # its weights, a local file (never a hub download)

The encoder returns what BLIP's ViT returns, [B, 1 + N, width] image tokens, with the same contract: token 0 is the
feature ITC projects, the rest are what the text stack cross-attends to (with token 0). Per family:

- ViT families (CLIP ViT, EVA02, SigLIP, DINOv2, ...): token 0 is the model's own pooled feature, timm's
  `forward_head(pre_logits=True)` ([CLS] after the final norm for CLIP / EVA02 / DINOv2, the attention pool for
  SigLIP, the normed mean for avg-pooled models); then the patch tokens of `forward_features` (prefix tokens such as
  [CLS] and DINOv2's registers are not repeated).
- CNNs (ResNet, CLIP ResNet-50, ConvNeXt, ...): the final feature grid flattened row by row (stride 32 unless an
  `output_stride` is given), plus a learned x/y position embedding, as CLIP-ViL (a CNN grid carries no position of
  its own); token 0 is the model's own pooled feature (CLIP ResNet's attention pool before its output projection,
  average pooling otherwise).

Pixels come normalised with BLIP's (CLIP's) mean and std, as every data pipeline here makes them; the encoder maps
them to the backbone's own mean and std (an exact per-channel affine map, skipped when the two agree), so one image
pipeline serves every backbone. `vision_token_width` adds a learned projection of every token to that width;
without it the text stack's cross-attention reads the backbone's own width.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..data.transforms import MEAN, STD

# timm modules whose models are ViTs: they take `img_size` (position embeddings resized on load by timm's own filter)
_VIT_MODULES = ("vision_transformer", "eva", "vision_transformer_relpos", "vision_transformer_sam", "beit", "deit")


@dataclass
class BackboneConfig:
    name: str                       # timm model name
    image_size: int = 224
    file: str = ""                  # local weights file: timm's pretrained_cfg_overlay=dict(file=...)
    kwargs: dict = field(default_factory=dict)  # timm.create_model keyword arguments (sizes, output_stride, ...)
    drop_path_rate: float = 0.0
    grad_ckpt: bool = False         # timm's set_grad_checkpointing (every block)
    token_width: int | None = None  # a learned projection of the tokens to this width; None: the backbone's width
    width: int | None = None        # the width of the tokens the encoder returns (set once built)


def is_vit(name: str) -> bool:
    import timm
    return timm.models.is_model_in_modules(name, _VIT_MODULES)


def create_trunk(cfg: BackboneConfig) -> nn.Module:
    """The timm model, headless (num_classes=0), with its weights from `cfg.file` when one is given."""
    import timm
    if not timm.is_model(cfg.name):
        import difflib
        close = difflib.get_close_matches(cfg.name, timm.list_models(), n=3)
        raise ValueError(f"vision_backbone: timm has no model {cfg.name!r}" + (f" (did you mean {close}?)" if close else ""))
    kw = dict(cfg.kwargs)
    if is_vit(cfg.name):
        kw.setdefault("img_size", cfg.image_size)
    if cfg.drop_path_rate:
        kw.setdefault("drop_path_rate", cfg.drop_path_rate)
    pretrained = bool(cfg.file)
    if pretrained:
        if not os.path.isfile(cfg.file):
            raise FileNotFoundError(f"vision_backbone_file: no file {cfg.file!r} (the {cfg.name} weights)")
        # `file` outranks every remote source in timm's resolution: nothing is downloaded
        kw["pretrained_cfg_overlay"] = dict(file=os.path.abspath(cfg.file))
    try:
        return timm.create_model(cfg.name, pretrained=pretrained, num_classes=0, **kw)
    except RuntimeError as e:  # timm's strict load: keys or shapes of the file do not fit the model
        raise RuntimeError(f"vision_backbone_file {cfg.file!r} does not fit timm's {cfg.name} "
                           f"(with {cfg.kwargs or 'no extra arguments'}): {e}") from e


class TimmBackbone(nn.Module):
    """A timm model behind BLIP's visual-encoder contract: pixels -> [B, 1 + N, width], token 0 pooled."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.cfg = cfg
        self.trunk = create_trunk(cfg)
        if cfg.grad_ckpt:
            self.trunk.set_grad_checkpointing(True)
        pc = self.trunk.pretrained_cfg
        self.mean, self.std = tuple(pc.get("mean", MEAN)), tuple(pc.get("std", STD))
        self.default_image_size = int(pc.get("input_size", (3, cfg.image_size, cfg.image_size))[-1])
        # BLIP-normalised pixels -> the backbone's normalisation: x * scale + shift (not saved: it follows the name)
        blip_mean, blip_std = torch.tensor(MEAN), torch.tensor(STD)
        mean, std = torch.tensor(self.mean), torch.tensor(self.std)
        self.renormalize = not (torch.equal(mean, blip_mean) and torch.equal(std, blip_std))
        self.register_buffer("scale", (blip_std / std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", ((blip_mean - mean) / std).view(1, 3, 1, 1), persistent=False)

        feats = self._probe(cfg.image_size)
        self.is_grid = feats.ndim == 4
        width = self.trunk.num_features
        if self.is_grid:  # CLIP-ViL: learned x/y position embeddings over the flattened grid
            _, c, h, w = feats.shape
            self.grid_size = (h, w)
            self.pos_y = nn.Parameter(torch.zeros(1, h, 1, c))
            self.pos_x = nn.Parameter(torch.zeros(1, 1, w, c))
            nn.init.trunc_normal_(self.pos_y, std=0.02)
            nn.init.trunc_normal_(self.pos_x, std=0.02)
            self.num_prefix_tokens = 0
        else:
            self.grid_size = None
            self.num_prefix_tokens = int(getattr(self.trunk, "num_prefix_tokens", 0))
        self.token_proj = nn.Linear(width, cfg.token_width) if cfg.token_width else nn.Identity()
        self.width = cfg.token_width or width
        cfg.width = self.width

    @torch.no_grad()
    def _probe(self, size: int) -> torch.Tensor:
        """One forward on a blank image (eval mode: no BatchNorm statistics move) for the output layout."""
        was = self.trunk.training
        self.trunk.eval()
        try:
            return self.trunk.forward_features(torch.zeros(1, 3, size, size))
        finally:
            self.trunk.train(was)

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """timm's forward_features on the backbone's own normalisation (ViT tokens or a CNN grid)."""
        x = pixel_values * self.scale + self.shift if self.renormalize else pixel_values
        return self.trunk.forward_features(x)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        feats = self.features(pixel_values)
        pooled = self.trunk.forward_head(feats, pre_logits=True)
        if self.is_grid:
            if feats.shape[-2:] != self.grid_size:
                raise ValueError(f"{self.cfg.name}: a {tuple(pixel_values.shape[-2:])} image gives a "
                                 f"{tuple(feats.shape[-2:])} grid; the model's position embedding is {self.grid_size} "
                                 f"(image_size {self.cfg.image_size})")
            tokens = (feats.permute(0, 2, 3, 1) + self.pos_y + self.pos_x).flatten(1, 2)
        else:
            tokens = feats[:, self.num_prefix_tokens:]
        return self.token_proj(torch.cat([pooled[:, None].to(tokens.dtype), tokens], dim=1))

def build_backbone(cfg: BackboneConfig) -> TimmBackbone:
    return TimmBackbone(cfg)


def layer_ids(encoder: nn.Module) -> tuple[dict[str, int], int]:
    """({parameter name: layer}, number of layers) of a visual encoder (BLIP's ViT or a TimmBackbone) from timm's
    group_matcher: the stem is layer 0, then block by block (the final norm with the last). Freezing the first N
    blocks and layer-wise LR decay count these. Parameters added around a timm trunk (the grid position embedding,
    the token projection) are new: they sit above the last layer (number of layers), never frozen or decayed."""
    from timm.models import group_parameters
    trunk, prefix = (encoder.trunk, "trunk.") if isinstance(encoder, TimmBackbone) else (encoder, "")
    ids = group_parameters(trunk, trunk.group_matcher(coarse=False), reverse=True)
    n = max(ids.values()) + 1
    out = {prefix + k: v for k, v in ids.items()}
    for k, _ in encoder.named_parameters():
        out.setdefault(k, n - 1 if k.startswith(prefix) else n)
    return out, n
