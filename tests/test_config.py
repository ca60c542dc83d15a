import argparse
import json
from pathlib import Path

import pytest

from blip.training.config import (Config, add_config_args, config_from_args, load_config, parse_override,
                         save_config)

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_every_config_loads():
    names = {p.stem for p in CONFIGS}
    assert {"pretrain", "retrieval_coco", "retrieval_flickr", "caption_coco", "nocaps", "vqa", "nlvr",
            "shapes_pretrain", "shapes_retrieval", "shapes_caption", "shapes_vqa", "shapes_nlvr"} <= names
    for p in CONFIGS:
        cfg = load_config(p)
        assert cfg.task, p


def test_original_values():
    c = load_config(CONFIGS[0].parent / "retrieval_coco.yaml")
    m = c.model
    assert (m["image_size"], c.batch_size_train, c.batch_size_test, c.options.k_test, m["negative_all_rank"],
            m["vit_grad_ckpt"], m["vit_ckpt_layer"], c.init_lr, c.min_lr, c.max_epoch, m["queue_size"]) == \
        (384, 32, 64, 256, True, True, 4, 1e-5, 0.0, 6, 57600)
    f = load_config(CONFIGS[0].parent / "retrieval_flickr.yaml")
    assert (f.options.k_test, f.model["negative_all_rank"]) == (128, False)
    p = load_config(CONFIGS[0].parent / "pretrain.yaml")
    assert (p.model["image_size"], p.batch_size, p.init_lr, p.warmup_lr, p.lr_decay_rate, p.warmup_steps,
            p.max_epoch) == (224, 75, 3e-4, 1e-6, 0.9, 3000, 20)
    v = load_config(CONFIGS[0].parent / "vqa.yaml")
    assert (v.model["image_size"], v.train_batch_size, v.test_batch_size, v.init_lr, v.options.inference,
            v.options.train_files) == (480, 16, 32, 2e-5, "rank", ["vqa_train", "vqa_val", "vg_qa"])
    cap = load_config(CONFIGS[0].parent / "caption_coco.yaml")
    assert (cap.model["prompt"], cap.options.max_length, cap.options.min_length, cap.options.num_beams,
            cap.train_batch_size) == \
        ("a picture of ", 20, 5, 3, 32)
    n = load_config(CONFIGS[0].parent / "nlvr.yaml")
    assert (n.init_lr, n.max_epoch, n.train_batch_size, n.test_batch_size) == (3e-5, 15, 16, 64)


def test_shapes_configs_are_tiny_and_consistent():
    from blip.models import ModelConfig
    sizes = set()
    for p in CONFIGS:
        c = load_config(p)
        # CapFilt's models bring their sizes, and so do the pretrained encoders of `init`
        if p.stem.startswith("shapes_") and p.stem != "shapes_capfilt" and not c.init:
            m = ModelConfig.from_overrides(**c.model)
            assert c.model.get("preset") == "tiny", p  # sizes as data, not written by hand
            assert m.image_size <= 64 and m.vision_width <= 192 and m.vision_depth <= 4
            assert m.image_size % m.patch_size == 0 and m.vision_width % m.vision_heads == 0
            assert m.med_config["hidden_size"] <= 128 and m.med_config["num_hidden_layers"] <= 4
            assert m.queue_size % c.train_batch_size == 0 and m.queue_size % (2 * c.train_batch_size) == 0
            sizes.add((m.image_size, m.patch_size, m.vision_width, m.vision_depth, m.med_config["hidden_size"]))
    assert len(sizes) == 1, sizes


def test_unknown_key_names_key_and_file(tmp_path):
    bad = tmp_path / "x.yaml"
    bad.write_text("init_lr: 1e-4\nbatch_sise: 8\n")
    with pytest.raises(ValueError, match=r"x\.yaml: unknown config key 'batch_sise'.*'batch_size'"):
        load_config(bad)
    with pytest.raises(ValueError, match="--set: unknown config key 'nope'"):
        load_config(None, ["nope=1"])


def test_overrides_are_yaml_scalars():
    c = load_config(None, ["task=vqa", "init_lr=1e-4", "vit_grad_ckpt=true", "max_epoch=3", "min_lr=0",
                           "prompt='a photo of '", "train_files=[a, b]", "grad_clip=1",
                           "med_config.num_hidden_layers=2", "pretrained="])
    assert c.init_lr == 1e-4 and c.model["vit_grad_ckpt"] is True and c.max_epoch == 3
    assert isinstance(c.min_lr, float) and c.grad_clip == 1.0 and isinstance(c.grad_clip, float)
    assert c.model["prompt"] == "a photo of " and c.options.train_files == ["a", "b"]
    assert c.model["med_config"] == {"num_hidden_layers": 2} and c.pretrained == ""
    assert parse_override("k = v=w") == ("k", "v=w")
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_override("init_lr")


@pytest.mark.parametrize("override, err", [("max_epoch=1.5", TypeError), ("vit_grad_ckpt=1", TypeError),
                                           ("init_lr=fast", TypeError), ("vit=huge", ValueError),
                                           ("precision=fp8", ValueError), ("seed=true", TypeError)])
def test_override_type_checks(override, err):
    with pytest.raises(err, match=override.split("=")[0]):
        load_config(None, [override])


def test_overrides_apply_after_the_file(tmp_path):
    c = load_config(CONFIGS[0].parent / "shapes_caption.yaml", ["med_config.num_hidden_layers=3"])
    assert c.model["med_config"] == {"num_hidden_layers": 3}  # only what is set; the preset fills the rest
    from blip.models import ModelConfig
    assert ModelConfig.from_overrides(**c.model).med_config == {"hidden_size": 64, "num_hidden_layers": 3,
                                                                "num_attention_heads": 2, "intermediate_size": 256}


def test_save_load_round_trip(tmp_path):
    cfg = load_config(CONFIGS[0].parent / "shapes_vqa.yaml", ["seed=7"])
    save_config(cfg, tmp_path / "sub" / "config.yaml")
    assert load_config(tmp_path / "sub" / "config.yaml") == cfg
    assert cfg.to_dict()["seed"] == 7 and Config().to_dict()["seed"] == 42


def test_add_config_args():
    parser = add_config_args(argparse.ArgumentParser())
    args = parser.parse_args(["--config", str(CONFIGS[0].parent / "nlvr.yaml"), "--set", "seed=1",
                              "max_epoch=2", "--set", "init_lr=1e-3", "--output-dir", "o",
                              "--evaluate", "--device", "cpu", "--resume", "latest"])
    assert args.overrides == ["seed=1", "max_epoch=2", "init_lr=1e-3"]
    assert args.evaluate and args.device == "cpu" and args.resume == "latest"
    cfg = config_from_args(args)
    assert (cfg.seed, cfg.max_epoch, cfg.init_lr, cfg.output_dir) == (1, 2, 1e-3, "o")
    plain = parser.parse_args(["--config", "c.yaml"])
    assert plain.overrides == [] and not plain.evaluate and plain.resume is None


def test_model_options_come_from_one_description(tmp_path):
    # Every ModelConfig option is a config key, kept only when set: nothing repeats or defaults them here.
    from dataclasses import fields
    from blip.models import ModelConfig
    names = {f.name for f in fields(ModelConfig)}
    assert not names & {f.name for f in fields(Config)}
    defaults = ModelConfig().to_dict()
    file = tmp_path / "all.yaml"
    file.write_text("".join(f"{n}: {json.dumps(v)}\n" for n, v in defaults.items()))
    assert load_config(file).model == defaults and load_config(None).model == {}
    bad = tmp_path / "x.yaml"
    bad.write_text("vision_widht: 8\n")
    with pytest.raises(ValueError, match="did you mean 'vision_width'"):
        load_config(bad)
    with pytest.raises(ValueError, match="preset"):
        load_config(None, ["preset=huge"])


def test_shapes_section_fits_the_generator():
    import inspect
    shapes = pytest.importorskip("data.shapes")
    params = inspect.signature(shapes.generate_shapes_world).parameters
    for p in CONFIGS:
        if p.stem.startswith("shapes_"):
            c = load_config(p)
            assert set(c.shapes) <= set(params), p
            if p.stem == "shapes_capfilt":
                continue
            from blip.models import ModelConfig
            assert c.shapes["image_size"] == ModelConfig.from_overrides(**c.model).image_size
            assert c.task != "vqa" or c.options.k_test <= len(shapes.answer_list())


def test_a_task_owns_its_keys(tmp_path):
    """A task's own keys live in its Options (cfg.options): typed and checked like the shared ones, refused for a
    task without them or a config without `task:`, each error naming key and owner."""
    import blip  # noqa: F401  (registers the library's tasks)
    from blip.tasks import RetrievalTask, VQATask
    c = load_config(None, ["task=retrieval", "k_test=16", "alpha=1"])
    assert isinstance(c.options, RetrievalTask.Options) and (c.options.k_test, c.options.alpha) == (16, 1.0)
    assert not hasattr(c, "k_test")  # nothing of a task's reaches the shared config
    with pytest.raises(ValueError, match=r"--set: unknown config key 'inference': task 'retrieval' has no such key "
                                         r"\(task vqa has\)"):
        load_config(None, ["task=retrieval", "inference=rank"])
    with pytest.raises(ValueError, match="'num_beams': a key of task capfilt|'num_beams': a key of task caption"):
        load_config(None, ["num_beams=2"])
    with pytest.raises(ValueError, match="'k_test' must be at least 1"):
        load_config(None, ["task=vqa", "k_test=0"])
    with pytest.raises(ValueError, match="'inference' must be one of"):
        load_config(None, ["task=vqa", "inference=guess"])
    with pytest.raises(TypeError, match="'vqa_root' expects str"):
        load_config(None, ["task=vqa", "vqa_root=3"])
    bad = tmp_path / "x.yaml"
    bad.write_text("task: vqa\nk_tset: 8\n")
    with pytest.raises(ValueError, match=r"x\.yaml: unknown config key 'k_tset' \(did you mean 'k_test'\?\)"):
        load_config(bad)
    with pytest.raises(ValueError, match="the config's task is 'retrieval', but VQATask runs"):
        VQATask(c)  # a config read for another task
    c.task = ""
    with pytest.raises(ValueError, match="read for task '' \\(RetrievalOptions\\)"):
        VQATask(c)  # its section is another task's all the same
    assert VQATask(load_config(None)).options == VQATask.Options()  # no task: the defaults


def test_a_new_task_brings_its_keys_in_its_own_file(tmp_path):
    """Defining a Task subclass registers its Options: a config for it reads, checks and round-trips its keys,
    with no edit of the shared config."""
    from dataclasses import dataclass
    from blip.tasks import Task
    from blip.training.config import OPTIONS, option

    @dataclass
    class CountOptions(Task.Options):
        shapes_counted: int = option(3, at_least=1)
        answer_file: str = option("", path="file")

    class CountTask(Task):
        Options = CountOptions
        names = ("count_test",)

    try:
        file = tmp_path / "count.yaml"
        file.write_text("task: count_test\nshapes_counted: 5\ninit_lr: 1e-4\n")
        c = load_config(file)
        assert CountTask(c).options == CountOptions(shapes_counted=5) and c.init_lr == 1e-4
        save_config(c, tmp_path / "saved.yaml")
        assert load_config(tmp_path / "saved.yaml") == c
        with pytest.raises(ValueError, match="at least 1"):
            load_config(file, ["shapes_counted=0"])
        from blip.training.run import check_inputs
        with pytest.raises(FileNotFoundError, match="config key 'answer_file': no file"):
            check_inputs(load_config(file, [f"answer_file={tmp_path / 'none.json'}"]))
        with pytest.raises(FileNotFoundError, match="config key 'pretrained': no file"):  # the shared keys' own
            check_inputs(load_config(file, [f"pretrained={tmp_path / 'none.safetensors'}"]))
        with pytest.raises(FileNotFoundError, match="config key 'image_root': no folder"):
            check_inputs(load_config(file, [f"image_root={tmp_path / 'nowhere'}"]), reads_roots=True)
        check_inputs(load_config(file, [f"image_root={tmp_path / 'nowhere'}"]))  # roots unread: not checked
    finally:
        OPTIONS.pop("count_test")
