"""The image encoder: timm's VisionTransformer with BLIP's sizes and options.

timm's parameter names are the original BLIP checkpoint's (`cls_token`, `pos_embed`, `patch_embed.proj`,
`blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`, `norm`), so original weights load as they are.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch.utils.checkpoint import checkpoint

VIT_PRESETS = {  # width, depth, heads
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}


@dataclass
class VisionConfig:
    image_size: int = 384
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    heads: int = 12
    drop_path_rate: float = 0.0
    grad_ckpt: bool = False
    ckpt_layer: int = 0  # checkpoint the LAST `ckpt_layer` blocks (the original's rule)
    layer_norm_eps: float = 1e-6
    intermediate_size: int | None = None  # MLP width; None: 4 * width (the original's mlp_ratio 4)


class BlipViT(VisionTransformer):
    """timm ViT that returns all tokens (no head) and checkpoints only its last `ckpt_layer` blocks."""

    def __init__(self, cfg: VisionConfig):
        super().__init__(
            img_size=cfg.image_size, patch_size=cfg.patch_size, num_classes=0, global_pool="",
            embed_dim=cfg.width, depth=cfg.depth, num_heads=cfg.heads, mlp_ratio=_mlp_ratio(cfg), qkv_bias=True,
            drop_path_rate=cfg.drop_path_rate, norm_layer=partial(nn.LayerNorm, eps=cfg.layer_norm_eps),
        )
        self.cfg = cfg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        first_ckpt = len(self.blocks) - self.cfg.ckpt_layer if self.cfg.grad_ckpt else len(self.blocks)
        for i, blk in enumerate(self.blocks):
            if i >= first_ckpt and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return self.norm(x)


def _mlp_ratio(cfg: VisionConfig) -> float:
    """timm sizes the MLP as int(width * mlp_ratio): a ratio that gives exactly `intermediate_size`."""
    inter = cfg.intermediate_size or 4 * cfg.width
    ratio = inter / cfg.width
    return ratio if int(cfg.width * ratio) == inter else (inter + 0.5) / cfg.width


def build_vit(cfg: VisionConfig) -> BlipViT:
    return BlipViT(cfg)


def resize_pos_embed(pos_embed: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Resize a [1, 1+g*g, D] position embedding to `num_patches` patches: [CLS] kept, grid bicubic.

    antialias off and align_corners False, as the original's `interpolate_pos_embed`.
    """
    old = int(round((pos_embed.shape[1] - 1) ** 0.5))
    new = int(round(num_patches ** 0.5))
    if old == new:
        return pos_embed
    return resample_abs_pos_embed(pos_embed.float(), new_size=[new, new], old_size=[old, old],
                                  num_prefix_tokens=1, interpolation="bicubic", antialias=False).to(pos_embed.dtype)
