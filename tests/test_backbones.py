"""Any timm image model under BLIP's text stack (blip/models/backbones.py): every family builds at a tiny size and trains
through ITC, ITM, LM and VQA; a local weights file gives exactly timm's features; checkpoints rebuild the backbone;
freezing and layer-wise LR decay make the parameter groups they say."""
import pytest
import timm
import torch
from safetensors.torch import save_file

import blip
from blip.training.optim import build_optimizer
from blip.data.transforms import MEAN, STD
from tests._tiny import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")
TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
FAMILIES = {  # timm name -> keyword arguments for a tiny size
    "clip_vit": ("vit_base_patch16_clip_224", TINY_VIT),
    "eva02": ("eva02_tiny_patch14_224", TINY_VIT),
    "siglip": ("vit_base_patch16_siglip_224", TINY_VIT),
    "dinov2_reg": ("vit_small_patch14_reg4_dinov2", TINY_VIT),
    "resnet": ("resnet18", dict(channels=[8, 16, 16, 32], layers=[1, 1, 1, 1], output_stride=8)),
    "convnext": ("convnext_atto", dict(dims=[8, 16, 16, 32], depths=[1, 1, 1, 1])),
}
MICRO = dict(preset="micro", queue_size=8)
PIXELS = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
TEXTS = ["a red circle", "two blue squares on the left", "a green triangle", "three crosses"]


def backbone(family, **kw):
    name, args = FAMILIES[family]
    return dict(MICRO, vision_backbone=name, vision_backbone_args=args, **kw)


def _grads_flow(model, loss):
    model.zero_grad()
    loss.backward()
    trunk = [p.grad for n, p in model.visual_encoder.named_parameters() if p.requires_grad]
    return all(g is not None for g in trunk) and any(float(g.abs().sum()) > 0 for g in trunk)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_trains_through_itc_itm_lm_and_vqa(family):
    torch.manual_seed(0)
    model = blip.load_model("pretrain", **backbone(family)).train()
    enc = model.visual_encoder
    tokens = enc(PIXELS)
    grid = enc.grid_size
    n_tokens = grid[0] * grid[1] if grid else (32 // 8) ** 2
    assert tokens.shape == (4, 1 + n_tokens, enc.width) and model.vision_cfg.width == enc.width
    model.momentum_update()
    losses = model.losses(PIXELS, TEXTS, alpha=0.4)
    assert set(losses) == {"loss_ita", "loss_itm", "loss_lm"} and all(torch.isfinite(v) for v in losses.values())
    assert _grads_flow(model, sum(losses.values()))
    if grid:  # the learned x/y position embedding of the grid is trained
        assert float(enc.pos_x.grad.abs().sum()) > 0 and float(enc.pos_y.grad.abs().sum()) > 0

    vqa = blip.load_model("vqa", **backbone(family)).train()
    loss = vqa.losses(PIXELS, ["what color is it?"] * 4, ["red", "blue", "green", "yes"], [1, 1, 1, 1],
                      [1.0, 1.0, 1.0, 1.0])["loss_vqa"]
    assert torch.isfinite(loss) and _grads_flow(vqa, loss)


def test_token_projection_sets_the_cross_attention_width():
    model = blip.load_model("itm", **backbone("resnet", vision_token_width=24))
    assert model.visual_encoder(PIXELS).shape[-1] == 24 == model.vision_cfg.width
    assert model.text_encoder.encoder.layer[0].crossattention.self.key.in_features == 24
    with pytest.raises(ValueError, match="vision_token_width"):
        blip.load_model("itm", **MICRO, vision_token_width=24)  # BLIP's ViT sets its width with vision_width


def _timm_file(tmp_path, family, seed=1):
    name, args = FAMILIES[family]
    torch.manual_seed(seed)
    ref = timm.create_model(name, num_classes=0, **args).eval()
    path = tmp_path / f"{family}.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    return ref, path


@pytest.mark.parametrize("family", ["clip_vit", "dinov2_reg", "resnet"])
def test_local_file_gives_exactly_timms_features(tmp_path, family):
    ref, path = _timm_file(tmp_path, family)
    model = blip.load_model("itm", **backbone(family, vision_backbone_file=str(path)))
    enc = model.visual_encoder
    for k, v in ref.state_dict().items():
        assert torch.equal(enc.trunk.state_dict()[k], v), k
    raw = PIXELS.sigmoid()  # pixels in [0, 1]: BLIP's normalisation in, the backbone's own inside
    blip_in = (raw - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    mean, std = (torch.tensor(ref.pretrained_cfg[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    with torch.no_grad():
        feats = ref.forward_features((raw - mean) / std)
        pooled = ref.forward_head(feats, pre_logits=True)
        ours, tokens = enc.features(blip_in), enc(blip_in)
    if family == "clip_vit":  # CLIP's mean and std are BLIP's: the very same input, bit for bit
        assert torch.equal(ours, feats)
    torch.testing.assert_close(ours, feats, rtol=0, atol=1e-5)
    torch.testing.assert_close(tokens[:, 0], pooled, rtol=0, atol=1e-5)  # token 0: the family's own pooled feature
    if enc.is_grid:
        grid = (feats.permute(0, 2, 3, 1) + enc.pos_y + enc.pos_x).flatten(1, 2)
        torch.testing.assert_close(tokens[:, 1:], grid, rtol=0, atol=1e-5)
    else:  # the patch tokens, prefix tokens ([CLS], registers) not repeated
        torch.testing.assert_close(tokens[:, 1:], feats[:, ref.num_prefix_tokens:], rtol=0, atol=1e-5)


def test_bad_backbone_names_and_files_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="vision_backbone_file"):
        blip.load_model("itm", **backbone("clip_vit", vision_backbone_file=str(tmp_path / "none.safetensors")))
    with pytest.raises(ValueError, match="timm has no model"):
        blip.load_model("itm", **MICRO, vision_backbone="vit_tiniest_patch99")
    _, path = _timm_file(tmp_path, "clip_vit")  # weights of another size than the model asks for
    with pytest.raises(RuntimeError, match="does not fit"):
        blip.load_model("itm", **dict(backbone("clip_vit", vision_backbone_file=str(path)),
                                      vision_backbone_args=dict(TINY_VIT, embed_dim=48)))


def test_checkpoint_rebuilds_the_backbone(tmp_path):
    _, path = _timm_file(tmp_path, "siglip")
    torch.manual_seed(0)
    model = blip.load_model("pretrain", **backbone("siglip", vision_backbone_file=str(path)))
    blip.save_weights(model, tmp_path / "model.safetensors")
    path.unlink()  # the checkpoint holds the backbone's weights: its first file is not needed again
    again = blip.load_model("pretrain", tmp_path / "model.safetensors", strict=True)
    assert again.cfg.vision_backbone == "vit_base_patch16_siglip_224" and again.cfg.vision_backbone_file == ""
    with torch.no_grad():
        torch.testing.assert_close(again.visual_encoder(PIXELS), model.visual_encoder(PIXELS), rtol=0, atol=0)
        torch.testing.assert_close(again.itc_similarity(PIXELS, TEXTS), model.itc_similarity(PIXELS, TEXTS))


def test_freeze_first_blocks_and_layer_decay_groups():
    model = blip.load_model("itm", **backbone("clip_vit", freeze_vision_blocks=1)).train()
    ids, n = model.vision_layers()  # stem 0, blocks 1 and 2, the final norm with the last block
    trunk = "visual_encoder.trunk."
    assert n == 3 and ids[trunk + "patch_embed.proj.weight"] == 0 and ids[trunk + "blocks.0.attn.qkv.weight"] == 1
    assert ids[trunk + "blocks.1.mlp.fc1.weight"] == 2 and ids[trunk + "norm.weight"] == 2
    frozen = {k for k, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {k for k, i in ids.items() if i <= 1}  # the stem and block 0
    assert not model.visual_encoder.trunk.blocks[0].training and model.visual_encoder.trunk.blocks[1].training

    cfg = tiny_config("layer_decay=0.5", "init_lr=1e-3", "weight_decay=0.05")
    opt = build_optimizer(model, cfg)
    scale = {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert all(id(params[k]) not in scale for k in frozen)  # frozen: not optimised at all
    assert scale[id(params[trunk + "blocks.1.mlp.fc1.weight"])] == 0.5 ** (3 - 2)
    assert scale[id(params[trunk + "norm.bias"])] == 0.5 and decay[id(params[trunk + "norm.bias"])] == 0.0
    assert scale[id(params["text_encoder.encoder.layer.0.attention.self.query.weight"])] == 1.0
    assert scale[id(params["itm_head.weight"])] == 1.0

    # BLIP's own ViT: 0.5^(L - i) from the patch embedding (layer 0) up
    vit = blip.load_model("itm", **MICRO)  # micro: depth 1 -> stem 0, block 1 (with the norm): L = 2
    opt = build_optimizer(vit, cfg)
    scale = {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    vp = dict(vit.named_parameters())
    assert scale[id(vp["visual_encoder.patch_embed.proj.weight"])] == 0.25
    assert scale[id(vp["visual_encoder.cls_token"])] == 0.25
    assert scale[id(vp["visual_encoder.blocks.0.attn.qkv.weight"])] == 0.5
    assert scale[id(vp["text_proj.weight"])] == 1.0


def test_frozen_cnn_keeps_its_weights_and_batchnorm_statistics():
    from blip.training.engine import train_step, setup, Progress
    from blip.tasks import PretrainTask
    from tests._tiny import PairData
    cfg = tiny_config("vision_backbone=resnet18", "freeze_vision=true", "queue_size=8", "batch_size=4",
                      "vision_backbone_args={channels: [8, 16, 16, 32], layers: [1, 1, 1, 1], output_stride: 8}",
                      "layer_decay=0.5", "init_lr=1e-3", "num_workers=0", "schedule=cosine")
    task = PretrainTask(cfg)
    model = task.build_model()
    before = {k: v.clone() for k, v in model.visual_encoder.trunk.state_dict().items()}
    run = setup(task, model, PairData(8), "/tmp/unused_out")
    model.train()
    assert not model.visual_encoder.trunk.bn1.training  # frozen: BatchNorm statistics stay as loaded
    train_step(run, run.data.batches(0, 0), Progress(0, 0, 1))
    after = model.visual_encoder.trunk.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and running statistics alike
    assert not torch.equal(model.visual_encoder.pos_x.detach(), torch.zeros_like(model.visual_encoder.pos_x))
    lrs = {g["lr_scale"]: g["lr"] for g in run.optimizer.param_groups}
    assert set(lrs) == {1.0} and lrs[1.0] == pytest.approx(1e-3)  # only the added position embedding and above


def test_grad_checkpointing_gives_the_same_gradients():
    out = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = blip.load_model("itm", **backbone("eva02", vit_grad_ckpt=ckpt)).train()
        assert model.visual_encoder.trunk.grad_checkpointing == ckpt
        model.visual_encoder(PIXELS).square().mean().backward()
        out.append(model.visual_encoder.trunk.blocks[0].attn.qkv.weight.grad.clone())
    torch.testing.assert_close(out[0], out[1])


def test_drop_path_reaches_the_backbone():
    model = blip.load_model("vqa", **backbone("convnext", drop_path_rate=0.1))  # timm's rule: 0 .. 0.1 by depth
    rates = [m.drop_prob for m in model.visual_encoder.trunk.modules() if type(m).__name__ == "DropPath"]
    assert rates and max(rates) == pytest.approx(0.1)
