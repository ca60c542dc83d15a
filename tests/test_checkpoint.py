"""Checkpoint loading: the original `.pth` layout (SPEC §3), position-embedding resizing, our safetensors,
fine-tuning from a pretraining checkpoint, and what bad input gives.

The original-layout state dicts are built here from SPEC §3's key table, independently of our modules'
`state_dict()`: if our names, shapes or key sets drift from the original's, these tests fail.
"""
import json
import re
import pickle

import pytest
import torch
import torch.nn.functional as F

import blip
from blip.models.checkpoint import CheckpointMismatchError, load_into

pytestmark = pytest.mark.usefixtures("one_thread")

IMAGE, PATCH, VW, VDEPTH = 32, 16, 48, 2
H, LAYERS, INTER, MAXPOS, VOCAB = 32, 2, 64, 40, 30524
EMBED, QUEUE = 16, 8
NLVR_LAYERS = 7  # layers 0-5 average the two images, layer 6 merges them (merge_layer)
MED = dict(hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=2, intermediate_size=INTER,
           max_position_embeddings=MAXPOS, vocab_size=VOCAB)



def overrides(task, image_size=IMAGE):
    med = dict(MED, num_hidden_layers=NLVR_LAYERS) if task == "nlvr" else MED
    return dict(image_size=image_size, patch_size=PATCH, vision_width=VW, vision_depth=VDEPTH, vision_heads=2,
                med_config=med, embed_dim=EMBED, queue_size=QUEUE)


# ----------------------------------------------------------------------- SPEC §3 key table, original names

def linear(prefix, out_f, in_f):
    return {prefix + ".weight": [out_f, in_f], prefix + ".bias": [out_f]}


def layer_norm(prefix, w):
    return {prefix + ".weight": [w], prefix + ".bias": [w]}


def vit_keys(prefix, image_size=IMAGE):
    n = 1 + (image_size // PATCH) ** 2
    k = {prefix + "cls_token": [1, 1, VW], prefix + "pos_embed": [1, n, VW],
         prefix + "patch_embed.proj.weight": [VW, 3, PATCH, PATCH], prefix + "patch_embed.proj.bias": [VW]}
    for i in range(VDEPTH):
        b = f"{prefix}blocks.{i}."
        k |= layer_norm(b + "norm1", VW) | linear(b + "attn.qkv", 3 * VW, VW) | linear(b + "attn.proj", VW, VW)
        k |= layer_norm(b + "norm2", VW) | linear(b + "mlp.fc1", 4 * VW, VW) | linear(b + "mlp.fc2", VW, 4 * VW)
    return k | layer_norm(prefix + "norm", VW)


def bert_keys(prefix, encoder_width, cross="single", layers=LAYERS, position_ids=True):
    """A BertModel without pooler: embeddings (no token types) + layers with cross-attention (or twins)."""
    k = {prefix + "embeddings.word_embeddings.weight": [VOCAB, H],
         prefix + "embeddings.position_embeddings.weight": [MAXPOS, H]}
    k |= layer_norm(prefix + "embeddings.LayerNorm", H)
    if position_ids:
        k[prefix + "embeddings.position_ids"] = [1, MAXPOS]
    for i in range(layers):
        b = f"{prefix}encoder.layer.{i}."
        for name in ("query", "key", "value"):
            k |= linear(b + "attention.self." + name, H, H)
        k |= linear(b + "attention.output.dense", H, H) | layer_norm(b + "attention.output.LayerNorm", H)
        if cross == "single":
            k |= linear(b + "crossattention.self.query", H, H)
            k |= linear(b + "crossattention.self.key", H, encoder_width)
            k |= linear(b + "crossattention.self.value", H, encoder_width)
            k |= linear(b + "crossattention.output.dense", H, H)
        else:  # NLVR2
            for twin in ("self0", "self1"):
                k |= linear(f"{b}crossattention.{twin}.query", H, H)
                k |= linear(f"{b}crossattention.{twin}.key", H, encoder_width)
                k |= linear(f"{b}crossattention.{twin}.value", H, encoder_width)
            k |= linear(b + "crossattention.output.dense0", H, H) | linear(b + "crossattention.output.dense1", H, H)
            if i >= 6:
                k |= linear(b + "crossattention.output.merge_layer", H, 2 * H)
        k |= layer_norm(b + "crossattention.output.LayerNorm", H)
        k |= linear(b + "intermediate.dense", INTER, H)
        k |= linear(b + "output.dense", H, INTER) | layer_norm(b + "output.LayerNorm", H)
    return k


def decoder_keys(prefix, encoder_width):
    k = bert_keys(prefix + "bert.", encoder_width)
    p = prefix + "cls.predictions."
    k |= {p + "bias": [VOCAB]} | linear(p + "transform.dense", H, H) | layer_norm(p + "transform.LayerNorm", H)
    return k | linear(p + "decoder", VOCAB, H)


def key_table(task, image_size=IMAGE):
    """{original key: shape} of the task's original checkpoint (SPEC §3 'which model has what')."""
    k = vit_keys("visual_encoder.", image_size)
    if task == "caption":
        return k | decoder_keys("text_decoder.", VW)
    if task == "vqa":
        return k | bert_keys("text_encoder.", VW) | decoder_keys("text_decoder.", H)
    if task == "nlvr":
        k |= bert_keys("text_encoder.", VW, cross="twin", layers=NLVR_LAYERS)
        return k | linear("cls_head.0", H, H) | linear("cls_head.2", 2, H)
    k |= bert_keys("text_encoder.", VW) | linear("vision_proj", EMBED, VW) | linear("text_proj", EMBED, H)
    k |= linear("itm_head", 2, H)
    if task == "itm":
        return k
    k |= vit_keys("visual_encoder_m.", image_size) | bert_keys("text_encoder_m.", VW)
    k |= linear("vision_proj_m", EMBED, VW) | linear("text_proj_m", EMBED, H)
    k |= {"temp": [], "image_queue": [EMBED, QUEUE], "text_queue": [EMBED, QUEUE]}
    if task == "retrieval":
        return k | {"ptr_queue": [1], "idx_queue": [1, QUEUE]}
    assert task == "pretrain"
    return k | {"queue_ptr": [1]} | decoder_keys("text_decoder.", VW)


def tied_to(key, task):
    """The key whose tensor this one IS in the original model (LM head; pretraining's decoder = encoder)."""
    if key.endswith("cls.predictions.decoder.weight"):
        return key.replace("cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight")
    if key.endswith("cls.predictions.decoder.bias"):
        return key.replace("decoder.bias", "bias")
    if task == "pretrain" and key.startswith("text_decoder.bert.") and ".attention." not in key:
        return key.replace("text_decoder.bert.", "text_encoder.")
    return None


def original_checkpoint(task, seed=0, image_size=IMAGE):
    g = torch.Generator().manual_seed(seed)
    table = key_table(task, image_size)
    sd = {}
    for key, shape in table.items():
        if key.endswith("position_ids"):
            sd[key] = torch.arange(shape[-1]).expand(shape)
        elif key in ("ptr_queue", "queue_ptr"):
            sd[key] = torch.zeros(1, dtype=torch.long)
        elif key == "idx_queue":
            sd[key] = torch.full(shape, -100, dtype=torch.long)
        else:
            sd[key] = torch.randn(shape, generator=g) * 0.2
    for key in table:
        if tied_to(key, task):
            sd[key] = sd[tied_to(key, task)]
    return {"model": sd, "epoch": 3}


def assert_loaded(model, sd, keys=None):
    own = model.state_dict()
    for k in keys or sd:
        if k.endswith("position_ids"):
            continue
        assert torch.equal(own[k], sd[k]), k


TASKS = ["caption", "itm", "retrieval", "vqa", "nlvr", "pretrain"]


@pytest.mark.parametrize("task", TASKS)
def test_original_layout_loads_strictly(task):
    ckpt = original_checkpoint(task)
    model = blip.load_model(task, ckpt, strict=True, **overrides(task))
    assert_loaded(model, ckpt["model"])
    table = key_table(task)
    assert set(model.state_dict()) == {k for k in table if not k.endswith("position_ids")}
    for k, shape in table.items():
        if not k.endswith("position_ids"):
            assert list(model.state_dict()[k].shape) == shape, k


# ------------------------------------------------------------------------------------ pos-embed resizing

def test_pos_embed_is_resized_bicubically_to_the_model_grid():
    ckpt = original_checkpoint("retrieval", image_size=64)  # 4x4 patches
    model = blip.load_model("retrieval", ckpt, **overrides("retrieval", image_size=96))  # 6x6 patches
    old = ckpt["model"]["visual_encoder.pos_embed"]
    grid = old[:, 1:].reshape(1, 4, 4, VW).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    for prefix in ("visual_encoder.", "visual_encoder_m."):
        new = model.state_dict()[prefix + "pos_embed"]
        assert new.shape == (1, 37, VW)
        assert torch.equal(new[:, 0], ckpt["model"][prefix + "pos_embed"][:, 0])  # [CLS] kept
        if prefix == "visual_encoder.":
            torch.testing.assert_close(new[:, 1:], want.reshape(1, 36, VW), rtol=0, atol=1e-6)
    assert_loaded(model, ckpt["model"], [k for k in ckpt["model"] if "pos_embed" not in k])
    x = torch.randn(1, 3, 96, 96)
    assert model.visual_encoder(x).shape == (1, 37, VW)


# -------------------------------------------------------------------------------------- our safetensors

@pytest.mark.parametrize("task", TASKS)
def test_safetensors_round_trip_restores_weights_and_config(tmp_path, task):
    opts = overrides(task, image_size=48) | dict(vision_layer_norm_eps=1e-5, prompt="a photo of ")
    torch.manual_seed(1)
    model = blip.load_model(task, **opts)
    with torch.no_grad():  # make the buffers differ from a fresh model's too
        for name, b in model.named_buffers():
            if b.is_floating_point():
                b.normal_()
    path = tmp_path / f"{task}.safetensors"
    blip.save_weights(model, path)
    again = blip.load_model(task, path)  # no options: the config comes from the file's metadata
    assert again.cfg == model.cfg
    assert again.cfg.image_size == 48 and again.cfg.prompt == "a photo of "
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    if hasattr(again, "text_decoder"):  # the tied LM head is still tied after loading
        dec = again.text_decoder
        assert dec.cls.predictions.decoder.weight is dec.bert.embeddings.word_embeddings.weight
    if task == "pretrain":
        assert again.text_decoder.bert.embeddings is again.text_encoder.embeddings
    # options still override the stored config
    assert blip.load_model(task, path, prompt="an image of ").cfg.prompt == "an image of "


# ------------------------------------------------------------------------------ fine-tuning from pretrain

@pytest.mark.parametrize("task", ["caption", "itm", "retrieval", "vqa"])
def test_pretrain_checkpoint_starts_the_fine_tuning_models(task):
    ckpt = original_checkpoint("pretrain")
    sd = ckpt["model"]
    model = blip.load_model(task, **overrides(task))
    info = load_into(model, ckpt)  # the default: fresh heads may be missing, extra weights are reported
    assert info["unexpected"], "a pretraining checkpoint carries weights this task has no use for"
    own = model.state_dict()
    loaded = [k for k in own if k in sd and own[k].shape == sd[k].shape]
    assert_loaded(model, sd, loaded)
    if task == "caption":
        assert not info["missing"]
        assert "text_encoder.embeddings.word_embeddings.weight" in info["unexpected"]
    if task == "itm":
        assert not info["missing"] and "queue_ptr" in info["unexpected"]
    if task == "retrieval":  # the idx queue and its pointer start fresh (pretraining has `queue_ptr`)
        assert set(info["missing"]) == {"ptr_queue", "idx_queue"}
        assert "queue_ptr" in info["unexpected"] and "text_decoder.cls.predictions.bias" in info["unexpected"]
        assert_loaded(model, sd, [k for k in own if "_m." in k])  # momentum copies from the checkpoint
    if task == "vqa":
        # the answer decoder starts from pretraining's decoder; its cross-attention reads the question
        # (text width), pretraining's reads the image (ViT width): those K/V are dropped and start fresh
        dec = "text_decoder.bert.encoder.layer.0."
        assert torch.equal(own[dec + "crossattention.self.query.weight"], sd[dec + "crossattention.self.query.weight"])
        assert torch.equal(own["text_encoder.encoder.layer.1.crossattention.self.key.weight"],
                           sd["text_encoder.encoder.layer.1.crossattention.self.key.weight"])
        assert set(info["missing"]) == {f"text_decoder.bert.encoder.layer.{i}.crossattention.self.{n}.{p}"
                                        for i in range(LAYERS) for n in ("key", "value") for p in ("weight",)}
    blip.load_model(task, ckpt, **overrides(task))  # the public entry point takes it too


def test_single_cross_attention_checkpoint_twins_into_nlvr():
    ckpt = original_checkpoint("itm")  # pretrain-like: one cross-attention per layer
    sd = ckpt["model"]
    model = blip.load_model("nlvr", **overrides("nlvr"))
    with pytest.raises(CheckpointMismatchError):  # its text encoder has 2 layers, this NLVR2 model 7
        load_into(model, ckpt)
    model = blip.load_model("nlvr", **overrides("nlvr") | dict(med_config=MED))  # 2 layers: no merge layer
    info = load_into(model, ckpt)
    own = model.state_dict()
    for i in range(LAYERS):
        b = f"text_encoder.encoder.layer.{i}.crossattention."
        for twin in ("self0", "self1"):
            for n in ("query", "key", "value"):
                assert torch.equal(own[f"{b}{twin}.{n}.weight"], sd[f"{b}self.{n}.weight"])
                assert torch.equal(own[f"{b}{twin}.{n}.bias"], sd[f"{b}self.{n}.bias"])
        for d in ("dense0", "dense1"):
            assert torch.equal(own[f"{b}output.{d}.weight"], sd[f"{b}output.dense.weight"])
        assert torch.equal(own[f"{b}output.LayerNorm.weight"], sd[f"{b}output.LayerNorm.weight"])
    assert {k.split(".")[0] for k in info["missing"]} == {"cls_head"}  # the NLVR2 head starts fresh
    assert "itm_head.weight" in info["unexpected"]


def test_pretrain_checkpoint_into_nlvr_with_merge_layers():
    """7 text layers: layers 0-5 twin, layer 6 also gets a fresh merge_layer."""
    ckpt = original_checkpoint("pretrain")
    sd = ckpt["model"]
    big = {k: v for k, v in sd.items()}
    for i in range(LAYERS, NLVR_LAYERS):  # extend the text encoder to 7 layers by repeating layer 1
        for k in [k for k in sd if k.startswith("text_encoder.encoder.layer.1.")]:
            big[k.replace(".layer.1.", f".layer.{i}.")] = sd[k]
    model = blip.load_model("nlvr", {"model": big}, **overrides("nlvr"))
    own = model.state_dict()
    b = "text_encoder.encoder.layer.6.crossattention."
    assert torch.equal(own[b + "self1.key.weight"], sd["text_encoder.encoder.layer.1.crossattention.self.key.weight"])
    assert torch.equal(own[b + "output.dense0.bias"], sd["text_encoder.encoder.layer.1.crossattention.output.dense.bias"])
    assert own[b + "output.merge_layer.weight"].shape == (H, 2 * H)


# ----------------------------------------------------------------------------------------------- bad input

def test_checkpoint_of_another_model_is_refused_with_the_keys_named():
    with pytest.raises(CheckpointMismatchError, match="foo"):
        blip.load_model("caption", {"model": {"foo": torch.zeros(3)}}, **overrides("caption"))
    with pytest.raises(CheckpointMismatchError, match=r"missing key.*text_encoder"):
        blip.load_model("nlvr", original_checkpoint("caption"), **overrides("nlvr"))
    with pytest.raises(CheckpointMismatchError, match=r"unexpected key.*text_decoder"):
        blip.load_model("itm", original_checkpoint("caption") | {}, strict=True, **overrides("itm"))
    # a caption checkpoint has no text encoder: refused by the itm model even when not strict
    with pytest.raises(CheckpointMismatchError, match=r"missing key.*text_encoder"):
        blip.load_model("itm", original_checkpoint("caption"), **overrides("itm"))


def test_checkpoint_of_another_size_is_refused():
    other = blip.load_model("caption", **overrides("caption") | dict(vision_width=64,
                                                                     med_config=dict(MED, hidden_size=48)))
    with pytest.raises(CheckpointMismatchError, match=r"another shape.*visual_encoder\.cls_token"):
        blip.load_model("caption", other.state_dict(), **overrides("caption"))


def test_missing_path_is_named(tmp_path):
    missing = tmp_path / "nowhere" / "model_base.pth"
    with pytest.raises(FileNotFoundError, match="model_base.pth"):
        blip.load_model("caption", missing, **overrides("caption"))
    with pytest.raises(FileNotFoundError, match="other.safetensors"):
        blip.load_model("caption", tmp_path / "other.safetensors")


def test_unreadable_image_is_named(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.jpg"):
        blip.load_images([bad], 32)
    with pytest.raises(ValueError, match="absent.png"):
        blip.load_images([tmp_path / "absent.png"], 32)


def test_unknown_model_option_and_med_config_key_are_named(tmp_path):
    with pytest.raises(TypeError, match="vision_widht"):
        blip.load_model("caption", vision_widht=48)
    with pytest.raises(ValueError, match="hiden_size"):
        blip.load_model("caption", **overrides("caption") | dict(med_config=dict(MED, hiden_size=32)))
    cfg = tmp_path / "med_config.json"
    cfg.write_text(json.dumps(dict(MED, encoder_widthh=48)))
    with pytest.raises(ValueError, match="encoder_widthh"):
        blip.load_model("caption", **overrides("caption") | dict(med_config=str(cfg)))
    with pytest.raises(ValueError, match="captioning"):
        blip.load_model("captioning")


class _Payload:
    """Unpickling this creates a file (it could as well run a command)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_pth_is_read_with_weights_only(tmp_path):
    ckpt = original_checkpoint("caption")
    good = tmp_path / "model.pth"
    torch.save(ckpt, good)
    model = blip.load_model("caption", good, strict=True, **overrides("caption"))
    assert_loaded(model, ckpt["model"])

    sentinel = tmp_path / "unpickled"
    evil = tmp_path / "evil.pth"
    torch.save({"model": ckpt["model"], "extra": _Payload(sentinel)}, evil)
    with pytest.raises(CheckpointMismatchError, match="evil.pth"):
        blip.load_model("caption", evil, **overrides("caption"))

    raw = tmp_path / "raw.pth"  # a plain pickle, not even a torch file
    raw.write_bytes(pickle.dumps({"model": {"x": _Payload(sentinel)}}, protocol=2))
    with pytest.raises(CheckpointMismatchError, match="raw.pth"):
        blip.load_model("caption", raw, **overrides("caption"))
    assert not sentinel.exists()
    pickle.loads(raw.read_bytes())  # what torch.load(weights_only=False) would have done
    assert sentinel.exists()


def test_pretrain_safetensors_initialises_the_caption_decoder(tmp_path):
    """Pretraining stores its encoder/decoder-shared tensors once; a caption model (no text encoder) must
    still find its decoder weights in that file."""
    import blip as _blip
    sizes = dict(image_size=32, patch_size=16, vision_width=24, vision_depth=1, vision_heads=2, embed_dim=8,
                 queue_size=8, med_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                               intermediate_size=32))
    torch.manual_seed(0)
    pre = _blip.load_model("pretrain", **sizes)
    _blip.save_weights(pre, tmp_path / "pre.safetensors")
    cap = _blip.load_model("caption", tmp_path / "pre.safetensors", strict=None)
    for k, v in cap.text_decoder.state_dict().items():
        assert torch.equal(v, pre.text_decoder.state_dict()[k]), k


# ------------------------------------------------------------------------------- weights of another shape

def _other_shape_keys(model, sd):
    own = model.state_dict()
    return {k: (list(sd[k].shape), list(own[k].shape)) for k in sd if k in own and sd[k].shape != own[k].shape}


def test_weight_of_another_shape_is_refused_naming_every_key_and_both_shapes():
    """A checkpoint whose text stack is a little wider (FFN 80 instead of 64) is refused, not loaded with
    random FFN layers: every such key is named with the checkpoint's and the model's shape."""
    wider = blip.load_model("caption", **overrides("caption") | dict(med_config=dict(MED, intermediate_size=80)))
    sd = wider.state_dict()
    model = blip.load_model("caption", **overrides("caption"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = _other_shape_keys(model, sd)
    assert len(bad) == 3 * LAYERS  # intermediate.dense weight+bias, output.dense weight, per layer
    for strict in (None, True):
        with pytest.raises(CheckpointMismatchError, match=r"6 weight\(s\) of another shape") as e:
            load_into(model, sd, strict=strict)
        for k, (have, want) in bad.items():
            assert f"{k} (checkpoint {have}, model {want})" in str(e.value)
    for k, v in model.state_dict().items():  # nothing was loaded
        assert torch.equal(v, before[k]), k
    # a wider stack everywhere: still every key, not the first few
    wide = blip.load_model("caption", **overrides("caption") | dict(med_config=dict(MED, hidden_size=48)))
    bad = _other_shape_keys(model, wide.state_dict())
    with pytest.raises(CheckpointMismatchError) as e:
        blip.load_model("caption", wide.state_dict(), **overrides("caption"))
    assert len(bad) > 50 and all(f"{k} (checkpoint {a}, model {b})" in str(e.value) for k, (a, b) in bad.items())
    assert "\n" not in str(e.value)  # one line, as the CLI prints it


def test_strict_false_reports_weights_of_another_shape_and_never_loads_them(caplog):
    wider = blip.load_model("caption", **overrides("caption") | dict(med_config=dict(MED, intermediate_size=80)))
    sd = wider.state_dict()
    model = blip.load_model("caption", **overrides("caption"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = _other_shape_keys(model, sd)
    with caplog.at_level("WARNING", logger="blip.models.checkpoint"):
        info = load_into(model, sd, strict=False)
    assert {k: (a, b) for k, a, b in info["mismatched"]} == bad
    assert set(info["missing"]) == set(bad)
    own = model.state_dict()
    for k in own:
        assert torch.equal(own[k], before[k] if k in bad else sd[k]), k  # the rest is loaded
    assert any("NOT loaded" in r.message and all(k in r.message for k in bad) for r in caplog.records)


def test_pos_embed_of_another_grid_is_resized_with_a_warning(caplog):
    ckpt = original_checkpoint("caption", image_size=64)
    with caplog.at_level("WARNING", logger="blip.models.checkpoint"):
        model = blip.load_model("caption", ckpt, strict=True, **overrides("caption", image_size=96))
    assert model.visual_encoder.pos_embed.shape == (1, 37, VW)
    assert any(r.levelname == "WARNING" and "visual_encoder.pos_embed" in r.message and "(1, 17, 48)" in r.message
               for r in caplog.records)
    # a pos_embed of another width is no grid to resize: refused like any other shape
    sd = dict(ckpt["model"], **{"visual_encoder.pos_embed": torch.zeros(1, 17, VW + 8)})
    with pytest.raises(CheckpointMismatchError, match=r"visual_encoder\.pos_embed \(checkpoint \[1, 17, 56\]"):
        blip.load_model("caption", {"model": sd}, **overrides("caption", image_size=96))


def test_vqa_answer_decoder_cross_kv_start_fresh_from_a_pretrain_checkpoint_of_another_vision_width(caplog):
    """As the original fine-tunes VQA from a ViT-L pretraining checkpoint: the answer decoder's cross-attention
    reads the (text-wide) question, the checkpoint's decoder read the (wider) image. Here vision 48 vs text 32."""
    sd = original_checkpoint("pretrain")["model"]
    model = blip.load_model("vqa", **overrides("vqa"))
    fresh = {f"text_decoder.bert.encoder.layer.{i}.crossattention.self.{n}.weight"
             for i in range(LAYERS) for n in ("key", "value")}
    init = {k: model.state_dict()[k].clone() for k in fresh}
    with caplog.at_level("WARNING", logger="blip.models.checkpoint"):
        info = load_into(model, sd)
    own = model.state_dict()
    assert set(info["missing"]) == fresh and not info["mismatched"]
    for k in fresh:
        assert own[k].shape == (H, H) and sd[k].shape == (H, VW) and torch.equal(own[k], init[k]), k
        bias = k.replace(".weight", ".bias")  # same shape: loaded, as the original's loader
        assert torch.equal(own[bias], sd[bias]), bias
    warning = [r.message for r in caplog.records if r.levelname == "WARNING" and "start fresh" in r.message]
    assert len(warning) == 1 and all(f"{k} (checkpoint [{H}, {VW}], model [{H}, {H}])" in warning[0] for k in fresh)
    # the question encoder's cross-attention reads the image: its K/V match (checked loaded)
    k = "text_encoder.encoder.layer.0.crossattention.self.key.weight"
    assert torch.equal(own[k], sd[k])


def test_only_the_vqa_answer_decoder_cross_kv_are_exempt():
    """An image-reading cross-attention (caption decoder, question encoder) with K/V of another width means
    another vision width: refused, as is a VQA model whose ViT differs from the checkpoint's."""
    sd = original_checkpoint("pretrain")["model"]
    kv = "text_decoder.bert.encoder.layer.1.crossattention.self.value.weight"
    odd = dict(sd, **{kv: torch.zeros(H, VW + 8)})  # the ViT matches, this decoder K/V does not
    with pytest.raises(CheckpointMismatchError, match=re.escape(f"{kv} (checkpoint [{H}, {VW + 8}], model [{H}, {VW}])")):
        blip.load_model("caption", odd, **overrides("caption"))
    enc = kv.replace("text_decoder.bert.", "text_encoder.")
    with pytest.raises(CheckpointMismatchError, match=re.escape(enc)):
        blip.load_model("vqa", dict(sd, **{enc: torch.zeros(H, VW + 8)}), **overrides("vqa"))
    with pytest.raises(CheckpointMismatchError, match=r"visual_encoder\.cls_token"):  # ViT-B model, ViT-L-like checkpoint
        blip.load_model("vqa", sd, **overrides("vqa") | dict(vision_width=64))
    # a caption model as wide as the checkpoint's ViT loads its decoder's cross-attention as it is
    cap = blip.load_model("caption", sd, **overrides("caption"))
    assert torch.equal(cap.state_dict()[kv], sd[kv])


# ------------------------------------------------------------------------------------- momentum encoders

@pytest.mark.parametrize("task", ["retrieval", "pretrain"])
def test_only_missing_momentum_weights_are_copied_from_the_online_ones(task):
    sd = original_checkpoint(task)["model"]
    gone = [k for k in sd if k.startswith(("visual_encoder_m.blocks.1.", "text_proj_m.", "text_encoder_m.encoder.layer.0."))]
    assert len(gone) > 10
    partial = {k: v for k, v in sd.items() if k not in gone}
    info = load_into(blip.load_model(task, **overrides(task)), partial)
    model = blip.load_model(task, partial, **overrides(task))
    assert set(gone) <= set(info["missing"])
    own = model.state_dict()
    for k in own:
        if "_m." not in k:
            continue
        online = k.replace("_m.", ".", 1)
        if k in gone:
            assert torch.equal(own[k], own[online]), k  # missing: the online weight
        else:
            assert torch.equal(own[k], sd[k]) and not torch.equal(own[k], own[online]), k  # present: kept
