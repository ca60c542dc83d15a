"""Grad-CAM for ITM (blip/inference/explain.py): the explicit attention it reads gives SDPA's outputs; maps lie on the ViT's
patch grid and on a timm CNN's feature grid; `blip explain` writes one overlay per word; and on the trained shapes
model the noun's map peaks on the named shape far above chance."""
import json
import threading

import numpy as np
import pytest
import torch
from PIL import Image

import blip
from blip.__main__ import main
from blip.inference.explain import default_layer, itm_gradcam, vision_grid
from blip.models.med import MultiHeadAttention, keep_attention_probs
from data.shapes import SIZES, captions, layout
from tests._tiny import scrambled_model

pytestmark = pytest.mark.usefixtures("one_thread")
TWO_LAYERS = dict(preset="micro", queue_size=8, med_config={"num_hidden_layers": 2})
RESNET = dict(vision_backbone="resnet18", vision_backbone_args=dict(channels=[8, 16, 16, 32], layers=[1, 1, 1, 1],
                                                                    output_stride=8))


def _scrambled(task, **options):
    return scrambled_model(task, **{**TWO_LAYERS, **options})


def test_explicit_attention_gives_sdpas_outputs_and_only_where_asked():
    model = _scrambled("pretrain")
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ids, mask = model.tokenize(["a red circle on the left", "two squares"], first_token=model.itm_first_token)
    image_embeds = model.visual_encoder(pixels)
    image_mask = torch.ones(image_embeds.shape[:2], dtype=torch.long)
    image_mask[1, -3:] = 0  # a cross-attention mask too
    attentions = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
    with torch.no_grad():
        sdpa = model.text_encoder(ids, mask, image_embeds, image_mask)
        sdpa_lm = model.text_decoder(ids, mask, image_embeds)
        with keep_attention_probs(*attentions) as kept:
            explicit = model.text_encoder(ids, mask, image_embeds, image_mask)
            cross = kept[model.text_encoder.encoder.layer[0].crossattention.self]
            explicit_lm = model.text_decoder(ids, mask, image_embeds)  # causal self-attention too
    torch.testing.assert_close(explicit, sdpa, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(explicit_lm, sdpa_lm, atol=1e-5, rtol=1e-5)
    assert cross.shape == (2, 2, ids.shape[1], image_embeds.shape[1])
    torch.testing.assert_close(cross.sum(-1), torch.ones(cross.shape[:-1]))
    assert float(cross[1, ..., -3:].max()) < 1e-3  # masked image tokens get no attention
    # another thread's forward inside the context keeps SDPA and stores nothing
    layer0 = model.text_encoder.encoder.layer[0].crossattention.self
    with keep_attention_probs(layer0) as kept:
        worker = threading.Thread(target=lambda: model.text_encoder(ids, mask, image_embeds))
        worker.start()
        worker.join()
        assert kept[layer0] is None
    with torch.no_grad():
        model.text_encoder(ids, mask, image_embeds)  # outside the context: nothing kept anywhere
    assert kept[layer0] is None


def test_default_layer_is_albefs_8_of_12_and_never_the_last():
    assert [default_layer(n) for n in (1, 2, 3, 6, 12)] == [0, 0, 1, 4, 8]


@pytest.mark.parametrize("options, grid", [({}, (2, 2)), (RESNET, (4, 4))], ids=["vit", "timm-resnet-grid"])
def test_maps_lie_on_the_vision_grid_one_per_word(options, grid):
    model = _scrambled("itm", **options)
    assert vision_grid(model) == grid
    image = Image.fromarray(np.random.RandomState(0).randint(0, 255, (40, 50, 3), dtype=np.uint8))
    cam = itm_gradcam(model, image, "Two tokenizers, left!")
    assert cam.text == "two tokenizers, left"
    assert cam.tokens[:4] == ["two", "token", "##izer", "##s"] and cam.words == ["two", "tokenizers", ",", "left"]
    assert cam.token_maps.shape == (len(cam.tokens), *grid) and cam.word_maps.shape == (4, *grid)
    torch.testing.assert_close(cam.word_maps[1], cam.token_maps[1:4].mean(0))
    torch.testing.assert_close(cam.text_map, cam.token_maps.mean(0))
    assert float(cam.token_maps.min()) >= 0 and float(cam.text_map.max()) > 0
    assert all(p.grad is None for p in model.parameters())  # a server's model is not touched
    peak = cam.peak(cam.text_map, 50, 40)
    row, col = peak["cell"]
    assert peak["x"] == pytest.approx((col + 0.5) * 50 / grid[1], abs=0.05)
    assert float(cam.text_map[row, col]) == float(cam.text_map.max())
    with pytest.raises(ValueError, match="layers 0..1"):
        itm_gradcam(model, image, "a circle", layer=2)
    with pytest.raises(ValueError, match="ITM head"):
        itm_gradcam(blip.load_model("caption", preset="micro"), image, "a circle")


def test_blip_explain_writes_an_overlay_per_word_and_the_peaks(tmp_path, capsys):
    model = _scrambled("itm")
    ckpt = tmp_path / "itm.safetensors"
    blip.save_weights(model, ckpt)
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.RandomState(1).randint(0, 255, (30, 60, 3), dtype=np.uint8)).save(photo)
    out = tmp_path / "out"
    assert main(["explain", str(photo), "--text", "a blue triangle", "--checkpoint", str(ckpt), "--device", "cpu",
                 "-o", str(out)]) == 0
    report = json.loads((out / "gradcam.json").read_text())
    assert [w["word"] for w in report["words"]] == ["a", "blue", "triangle"] and report["size"] == [60, 30]
    for w in report["words"] + [report["text_map"]]:
        assert Image.open(out / w["file"]).size == (256, 128)  # shown at 256 pixels, peaks in the image's own
        assert 0 <= w["peak"]["x"] <= 60 and 0 <= w["peak"]["y"] <= 30
    assert report["itm"] == pytest.approx(model.itm_score(blip.load_images([photo], 32), ["a blue triangle"]).item(),
                                          abs=1e-5)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a picture")
    assert main(["explain", str(broken), "--text", "x", "--checkpoint", str(ckpt), "--device", "cpu",
                 "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot read image") and "broken.png" in err[0]
    # an earlier explanation is refused, never overwritten; --overwrite moves it aside
    again = ["explain", str(photo), "--text", "a red circle", "--checkpoint", str(ckpt), "--device", "cpu", "-o",
             str(out)]
    assert main(again) == 2 and "holds an explanation" in capsys.readouterr().err
    assert json.loads((out / "gradcam.json").read_text()) == report
    assert main([*again, "--overwrite"]) == 0
    assert [w["word"] for w in json.loads((out / "gradcam.json").read_text())["words"]] == ["a", "red", "circle"]
    (aside,) = tmp_path.glob("out.old-*")
    assert json.loads((aside / "gradcam.json").read_text()) == report


def shape_boxes(scene, size):
    """Each shape's box (x0, y0, x1, y1) in pixels: its layout centre, radius, and the renderer's jitter."""
    r = SIZES[scene["size"]] * size / 2 + 0.02 * size
    return [(ux * size - r, uy * size - r, ux * size + r, uy * size + r)
            for ux, uy in layout(scene["position"], scene["count"])]


def test_noun_map_peaks_on_the_named_shape_of_the_trained_model(shapes_main_job):
    """The README's main job (tiny BLIP, 10 epochs from scratch): for a held-out image and its caption '{a} {size}
    {colour} {shape} {position}', the shape word's map peaks inside a box of that shape far more often than a
    uniformly random point would (chance = the boxes' share of the image)."""
    _, run, world = shapes_main_job
    model = blip.load_model(None, run)
    size = model.vision_cfg.image_size
    scenes = {i: s for i, s in json.loads((world / "scenes.json").read_text()).items() if s["split"] == "test"}
    yy, xx = np.mgrid[:size, :size] + 0.5
    hits, chance = [], []
    for i, scene in scenes.items():
        cam = itm_gradcam(model, world / f"images/test/shapes_{int(i):06d}.png", captions(scene)[4])
        assert cam.words[3].startswith(scene["kind"][:5])  # '{a} {size} {colour} {shape} {position}'
        peak = cam.peak(cam.word_maps[3], size, size)
        boxes = shape_boxes(scene, size)
        hits.append(any(x0 <= peak["x"] <= x1 and y0 <= peak["y"] <= y1 for x0, y0, x1, y1 in boxes))
        covered = np.zeros((size, size), bool)
        for x0, y0, x1, y1 in boxes:
            covered |= (xx >= x0) & (xx <= x1) & (yy >= y0) & (yy <= y1)
        chance.append(covered.mean())
    rate, chance = float(np.mean(hits)), float(np.mean(chance))
    print(f"Grad-CAM noun peak inside its shape: {rate:.2f} of {len(hits)} held-out images (chance {chance:.3f})")
    assert rate > 3 * chance and rate > 0.4  # measured 0.58 against chance 0.097 (layer 0 of 2)
