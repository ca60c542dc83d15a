"""Grad-CAM for image-text matching: where in the image each word of a text is found (ALBEF's and BLIP's demo).

One cross-attention layer of the ITM text encoder gives, for every text token, its attention over the image
tokens; Grad-CAM weighs it by the gradient of the ITM match logit with respect to those probabilities:

    map[token] = mean over heads of clamp(probabilities * d logit[match] / d probabilities, min=0)

(ALBEF clamps the gradient before the product; probabilities are never negative, so it is the same map.) Image
token 0 (the ViT's [CLS], a timm backbone's pooled feature) is dropped and the rest laid on the vision grid: a
ViT's patches, or a timm CNN's H x W feature grid. Word pieces merge into words (the mean of their maps); the
whole-text map is the mean over every word piece ([CLS]/[ENC] and [SEP] left out), as LAVIS's compute_gradcam.

    cam = blip.inference.explain.itm_gradcam(model, "photo.jpg", "a dog on a beach")
    cam.words, cam.word_maps            # ['a', 'dog', ...], [W, grid_h, grid_w]
    overlay(image, cam.word_maps[1])    # a PIL image: the map, upsampled, blended over the picture
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..models.med import keep_attention_probs
from ..data.tokenizer import get_tokenizer, pre_caption


def default_layer(num_layers: int) -> int:
    """ALBEF's layer 8 of 12 (0-based, two thirds up) scaled to the text encoder's depth, never its last layer:
    the ITM head reads only the first token of the last layer, so that layer's word rows get no gradient at all
    (a 2-layer model: layer 0)."""
    return max(0, min(num_layers - 2, round(num_layers * 2 / 3)))


def vision_grid(model) -> tuple[int, int]:
    """(rows, columns) of the image tokens after token 0: a ViT's patch grid or a timm CNN's feature grid."""
    encoder = model.visual_encoder
    if getattr(encoder, "is_grid", False):
        return tuple(encoder.grid_size)
    vit = getattr(encoder, "trunk", encoder)  # a timm ViT behind TimmBackbone, or BLIP's own
    if not hasattr(vit, "patch_embed"):
        raise ValueError(f"{type(vit).__name__}: no patch grid known to lay image tokens on")
    return tuple(vit.patch_embed.grid_size)


@dataclass
class GradCAM:
    """Grad-CAM maps of one (image, text) pair, on the vision grid (grid_h x grid_w)."""
    text: str                  # the text as the model read it (cleaned, maybe truncated)
    tokens: list[str]          # its word pieces ([CLS]/[ENC] and [SEP] left out)
    words: list[str]           # word pieces merged
    token_maps: torch.Tensor   # [T, grid_h, grid_w]
    word_maps: torch.Tensor    # [W, grid_h, grid_w]
    text_map: torch.Tensor     # [grid_h, grid_w]
    itm: float                 # match probability
    layer: int                 # the cross-attention layer read

    def peak(self, heat: torch.Tensor, width: int, height: int) -> dict:
        """Where `heat` (a grid map) peaks, in the pixels of a `width` x `height` image: the centre of its
        strongest cell (where the bilinear upsampling an overlay shows peaks too)."""
        gh, gw = heat.shape
        row, col = divmod(int(heat.argmax()), gw)
        return {"x": round((col + 0.5) * width / gw, 1), "y": round((row + 0.5) * height / gh, 1),
                "cell": [row, col], "value": float(heat[row, col])}


def _words(tokens: list[str]) -> list[list[int]]:
    """Indices of each word's pieces: a '##' piece continues the word before it."""
    groups: list[list[int]] = []
    for i, t in enumerate(tokens):
        if t.startswith("##") and groups:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def itm_gradcam(model, image, text: str, layer: int | None = None) -> GradCAM:
    """Grad-CAM maps of `text` on `image` (a path, a PIL image or normalised pixels [1, 3, S, S]) from the ITM
    text encoder's cross-attention `layer` (default: default_layer). `model`: an itm, retrieval or pretrain model.
    Runs with gradients (not inside torch.inference_mode); the parameters' .grad is left untouched."""
    if not hasattr(model, "itm_head"):
        raise ValueError(f"Grad-CAM reads the ITM head: load an itm, retrieval or pretrain model, not "
                         f"{getattr(model, 'task', type(model).__name__)!r}")
    layers = model.text_encoder.encoder.layer
    layer = default_layer(len(layers)) if layer is None else layer
    if not 0 <= layer < len(layers):
        raise ValueError(f"--layer {layer}: the text encoder has cross-attention layers 0..{len(layers) - 1}")
    text = pre_caption(text)
    if not text:
        raise ValueError("Grad-CAM needs a non-empty text")
    if isinstance(image, torch.Tensor):
        pixels = image.to(model.device)
    else:
        from ..data.images import load_images
        pixels = load_images([image], model.vision_cfg.image_size, model.device)
    pixels = pixels.to(next(model.parameters()).dtype)
    ids, mask = model.tokenize([text], max_length=model.text_max_length, first_token=model.itm_first_token)
    grid = vision_grid(model)
    attention = layers[layer].crossattention.self
    with torch.no_grad():
        image_embeds = model.visual_encoder(pixels)
    if image_embeds.shape[1] - 1 != grid[0] * grid[1]:
        raise ValueError(f"{image_embeds.shape[1] - 1} image tokens do not fill the {grid[0]}x{grid[1]} grid")
    # a leaf that asks for a gradient: the probabilities then have one whatever the parameters' requires_grad
    image_embeds = image_embeds.detach().requires_grad_(True)
    with torch.enable_grad(), keep_attention_probs(attention) as kept:
        logits = model.itm_logits(image_embeds, ids, mask)
        probs = kept[attention]
        (grad,) = torch.autograd.grad(logits[0, 1], probs)
    cam = (probs * grad).clamp(min=0)[0].mean(0)[:, 1:].detach().float().cpu()  # [L, N]: heads averaged
    n = int(mask[0].sum())
    cam = cam[1:n - 1].reshape(n - 2, *grid)  # word pieces only
    tokens = get_tokenizer().convert_ids_to_tokens(ids[0, 1:n - 1].tolist())
    groups = _words(tokens)
    words = ["".join(tokens[i].removeprefix("##") for i in g) for g in groups]
    word_maps = torch.stack([cam[g].mean(0) for g in groups])
    itm = logits.detach().float().softmax(-1)[0, 1].item()
    return GradCAM(text, tokens, words, cam, word_maps, cam.mean(0), itm, layer)


# A dark-to-bright ramp (black, purple, red, orange, yellow, white) for heat maps, as matplotlib's 'inferno'.
_RAMP = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float32)


def heat_colours(heat: np.ndarray) -> np.ndarray:
    """[H, W] values in 0..1 -> [H, W, 3] uint8 colours along _RAMP."""
    stops = np.linspace(0, 1, len(_RAMP))
    return np.stack([np.interp(heat, stops, _RAMP[:, c]) for c in range(3)], -1).astype(np.uint8)


def overlay(image, heat: torch.Tensor, alpha: float = 0.55):
    """A PIL image: `heat` (a grid map) scaled to 0..1, upsampled bilinearly to the image's size and blended over
    it (`alpha`: the heat map's weight)."""
    from PIL import Image
    w, h = image.size
    heat = F.interpolate(heat[None, None].float(), size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    low, high = float(heat.min()), float(heat.max())
    heat = (heat - low) / (high - low) if high > low else torch.zeros_like(heat)
    coloured = Image.fromarray(heat_colours(heat.numpy()))
    return Image.blend(image.convert("RGB"), coloured, alpha)


def display_copy(image, max_side: int = 768, min_side: int = 256):
    """The image scaled for an overlay: down to `max_side` on its long side, small ones up to `min_side` (a 32-pixel
    picture, pixelated rather than blurred, so each grid cell stays visible)."""
    from PIL import Image
    scale = min(max_side / max(image.size), max(1.0, min_side / max(image.size)))
    if scale == 1.0:
        return image.copy()
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.NEAREST if scale > 1 else Image.BICUBIC)


def explain_to_folder(model, image_path, text: str, out_dir, *, layer: int | None = None, max_side: int = 768,
                      overwrite: bool = False) -> dict:
    """`blip explain`: one overlay PNG per word (NN_word.png) and one of the whole text (text.png) under
    `out_dir`, and gradcam.json: the match probability and each map's peak in the image's own pixels. Overlays
    are drawn on display_copy(image, max_side) (small PNGs); peaks are in the image's own pixels. A folder that
    holds an earlier explanation is refused unless `overwrite` (then moved aside, as every output of the project)."""
    import json
    from pathlib import Path

    from ..models.checkpoint import atomic_write, move_aside
    from ..data.datasets import read_image_or_refuse
    from ..errors import OutputExistsError
    image = read_image_or_refuse(image_path)  # a bad input is named before any output is refused or moved
    out = Path(out_dir)
    if (out / "gradcam.json").exists():
        if not overwrite:
            raise OutputExistsError(f"{out} holds an explanation (gradcam.json): --overwrite to move it aside, or "
                                    f"another -o")
        move_aside(out)
    cam = itm_gradcam(model, image, text, layer)
    out.mkdir(parents=True, exist_ok=True)
    shown = display_copy(image, max_side)
    width, height = image.size
    words = []
    for i, (word, heat) in enumerate(zip(cam.words, cam.word_maps)):
        name = f"{i:02d}_{''.join(c if c.isalnum() else '_' for c in word)}.png"
        atomic_write(out / name, lambda tmp, heat=heat: overlay(shown, heat).save(tmp, format="PNG"))
        words.append({"word": word, "file": name, "peak": cam.peak(heat, width, height)})
    atomic_write(out / "text.png", lambda tmp: overlay(shown, cam.text_map).save(tmp, format="PNG"))
    report = {"image": str(image_path), "text": cam.text, "itm": cam.itm, "layer": cam.layer,
              "grid": list(cam.text_map.shape), "size": [width, height], "words": words,
              "text_map": {"file": "text.png", "peak": cam.peak(cam.text_map, width, height)}}
    atomic_write(out / "gradcam.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2)))
    return report
