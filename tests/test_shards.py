"""Tar shards as real users make them: plain `tar`, brace lists, `pipe:` URLs, img2dataset's layout, rank/worker
splits, resampling, the seeded shuffle buffer, epoch sizing, exact mid-epoch resume, and CapFilt's reader."""
import io
import json
import logging
import shutil
import subprocess
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from blip.tasks.pretrain import WebDatasetShards
from blip.data.shards import ShardOrderError, expand_shards
from blip.data import transforms as T


def _png(seed, size=16):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _tar(path, members):
    """members: [(name, bytes)] written in that order."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def _samples(n, start=0, prefix=""):
    return [[(f"{prefix}{k:06d}.png", _png(k)), (f"{prefix}{k:06d}.txt", f"Caption {k}.".encode())]
            for k in range(start, start + n)]


def _shards(tmp_path, n_shards, per_shard):
    for s in range(n_shards):
        _tar(tmp_path / f"shard-{s:05d}.tar", [m for smp in _samples(per_shard, s * per_shard) for m in smp])
    return str(tmp_path / ("shard-{00000..%05d}.tar" % (n_shards - 1)))


def _captions(ds):
    return [c for _, c in ds]


@pytest.fixture
def tf():
    return T.test_transform(16)


# ---- item 1: a shard made with plain `tar` ----

def test_plain_tar_shard_with_dot_slash_members_counts_and_reads_every_sample(tmp_path, tf):
    src = tmp_path / "dir"
    src.mkdir()
    for smp in _samples(20):
        for name, data in smp:
            (src / name).write_bytes(data)
    if shutil.which("tar"):
        subprocess.run(["tar", "--sort=name", "-C", str(src), "-cf", str(tmp_path / "sorted.tar"), "."], check=True)
    else:  # the same members, './' names, sorted
        _tar(tmp_path / "sorted.tar", [("./" + n, d) for smp in _samples(20) for n, d in smp])
    ds = WebDatasetShards(str(tmp_path / "sorted.tar"), tf)
    assert len(ds) == 20  # was 1: keys cut at the first dot of './000001.jpg'
    assert sorted(_captions(ds)) == sorted(f"caption {k}" for k in range(20)) and ds.num_skipped == 0


def test_non_adjacent_members_are_refused_with_the_shard_name_and_the_fix(tmp_path, tf, caplog):
    # directory order: every image first, then every caption (what plain `tar -cf` may write)
    members = [("./" + n, d) for smp in _samples(20) for n, d in smp]
    shard = _tar(tmp_path / "dirorder.tar", members[0::2] + members[1::2])
    with pytest.raises(ShardOrderError, match=r"dirorder\.tar.*not adjacent.*--sort=name"):
        len(WebDatasetShards(shard, tf))  # counting the epoch
    with pytest.raises(ShardOrderError, match=r"dirorder\.tar.*--sort=name"):
        _captions(WebDatasetShards(shard, tf, num_samples=20))  # streaming, no count
    from blip.inference.capfilt import list_pairs
    with pytest.raises(ShardOrderError, match=r"dirorder\.tar"):
        list_pairs(shard)  # CapFilt's random-access reader refuses it the same way


# ---- URL forms and epoch sizing ----

def test_brace_lists_pipe_urls_and_epoch_size(tmp_path, tf):
    spec = _shards(tmp_path, 3, 4)
    assert expand_shards(spec) == [str(tmp_path / f"shard-{s:05d}.tar") for s in range(3)]
    local = WebDatasetShards(spec, tf)
    assert len(local) == 12 and sorted(_captions(local)) == sorted(f"caption {k}" for k in range(12))
    assert len(WebDatasetShards(str(tmp_path / "*.tar"), tf)) == 12  # globs still work
    piped = f"pipe:cat {tmp_path}/shard-{{00000..00002}}.tar"
    assert expand_shards(piped)[1] == f"pipe:cat {tmp_path}/shard-00001.tar"
    with pytest.raises(ValueError, match="train_num_samples"):
        len(WebDatasetShards(piped, tf))  # no count of a stream: told what to set
    streamed = WebDatasetShards(piped, tf, num_samples=10)
    assert len(streamed) == 10 and _captions(streamed) == _captions(local)
    assert len(WebDatasetShards(spec, tf, num_samples=7)) == 7
    both = WebDatasetShards(f"{tmp_path}/shard-00000.tar::{tmp_path}/shard-00002.tar", tf)
    assert len(both) == 8
    from blip.inference.capfilt import list_pairs
    assert len(list_pairs(spec)) == 12
    with pytest.raises(ValueError, match="pipe:.*local"):
        list_pairs(piped)


def test_img2dataset_layout_read_as_it_is(tmp_path, tf, caplog):
    def meta(k, caption):
        return json.dumps({"url": f"http://x/{k}.jpg", "caption": caption, "key": f"{k:09d}", "status": "success",
                           "error_message": None, "width": 16, "height": 16}).encode()

    jpg = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(jpg, "JPEG")
    jpg = jpg.getvalue()
    members = []
    for k, (txt, cap) in enumerate([("A Dog.", "A Dog."), ("", "From The Json."), (None, "Json Only."),
                                    ("", ""), ("Bad json", None)]):
        members.append((f"{k:09d}.jpg", jpg))
        if txt is not None:
            members.append((f"{k:09d}.txt", txt.encode()))
        members.append((f"{k:09d}.json", meta(k, cap) if cap is not None else b'{"caption": "x",'))
    shard = _tar(tmp_path / "00000.tar", members)
    (tmp_path / "00000_stats.json").write_text('{"count": 6, "successes": 5}')
    (tmp_path / "00000.parquet").write_bytes(b"PAR1")
    ds = WebDatasetShards(str(tmp_path / "{00000..00000}.tar"), tf)
    assert len(ds) == 5
    with caplog.at_level(logging.WARNING, logger="blip.data.datasets"):
        caps = _captions(ds)
    assert caps == ["a dog", "from the json", "json only", "bad json"]  # txt first; an empty txt -> the json's
    assert any("000000003" in r.getMessage() and "no caption" in r.getMessage() for r in caplog.records)
    from blip.inference.capfilt import list_pairs
    assert [p.caption for p in list_pairs(shard)] == ["A Dog.", "From The Json.", "Json Only.", "Bad json"]


def test_bad_json_member_is_skipped_with_its_name_and_position(tmp_path, tf, caplog):
    shard = _tar(tmp_path / "s.tar", [("a.png", _png(0)), ("a.json", b'{"caption": "ok"}'),
                                      ("b.png", _png(1)), ("b.json", b'{"caption": "x",\n oops}')])
    with caplog.at_level(logging.WARNING, logger="blip.data.datasets"):
        assert _captions(WebDatasetShards(shard, tf)) == ["ok"]
    assert any("s.tar:b.json" in r.getMessage() and "line 2 column 2" in r.getMessage() for r in caplog.records)


# ---- splits, resampling, shuffle buffer ----

def test_split_by_rank_and_worker_shuffle_buffer_and_resampling(tmp_path, tf):
    spec = _shards(tmp_path, 4, 5)
    every = sorted(f"caption {k}" for k in range(20))
    parts = [_captions(WebDatasetShards(spec, tf, shuffle=True, seed=3, rank=r, world_size=2)) for r in range(2)]
    assert sorted(parts[0] + parts[1]) == every and len(parts[0]) == len(parts[1]) == 10

    def epoch(e, **kw):
        ds = WebDatasetShards(spec, tf, shuffle=True, seed=3, **{"shuffle_buffer": 8, **kw})
        ds.set_epoch(e)
        return _captions(ds)

    assert epoch(0) == epoch(0) and sorted(epoch(0)) == every  # seeded: the same stream again
    assert epoch(0) != epoch(1) and sorted(epoch(1)) == every
    shard_order = [int(c.split()[1]) // 5 for c in epoch(0, shuffle_buffer=0)]
    assert shard_order != sorted(shard_order)  # shards shuffled (seed 3), the buffer off

    # DataLoader workers split shards too: 2 workers x 2 ranks = 4 readers, one shard each
    got = [[c for _, caps in torch.utils.data.DataLoader(
        WebDatasetShards(spec, tf, shuffle=True, seed=3, rank=r, world_size=2), batch_size=5, num_workers=2)
        for c in caps] for r in range(2)]
    assert sorted(got[0] + got[1]) == every and len(got[0]) == len(got[1]) == 10

    def resampled(rank, e=0, n=50):
        ds = WebDatasetShards(spec, tf, shuffle=True, seed=3, resampled=True, rank=rank, world_size=2)
        ds.set_epoch(e)
        it = iter(ds)
        return [next(it)[1] for _ in range(n)]  # endless: more samples than the shards hold

    r0 = resampled(0)
    assert r0 == resampled(0) and r0 != resampled(1) and r0 != resampled(0, e=1)
    assert set(r0) <= set(every)
    assert len(WebDatasetShards(spec, tf, resampled=True)) == 20


# ---- exact mid-epoch resume ----

@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_is_exact(tmp_path, one_thread, workers):
    """N steps uninterrupted == killed after k steps and resumed, bit for bit, with a shuffle buffer, shuffled
    shards and an epoch sized by num_samples (train_num_samples)."""
    from blip.training.engine import fit
    from tests.test_engine import _assert_same_weights, _pretrain
    from data.shapes import generate_shapes_world
    files = generate_shapes_world(tmp_path / "w", n_train=24, n_val=2, n_test=2, image_size=32, n_shards=4)

    def data():
        return WebDatasetShards(files["pretrain_shards"], T.test_transform(32), shuffle=True, seed=1,
                                  shuffle_buffer=6, num_samples=20)  # 5 steps of 4 per epoch

    task, full = _pretrain(num_workers=workers, max_epoch=2)
    fit(task, full, data(), tmp_path / "a")
    task, part = _pretrain(num_workers=workers, max_epoch=2, save_every_steps=1)
    fit(task, part, data(), tmp_path / "b", max_steps=7)  # killed in epoch 1, step 2
    task, resumed = _pretrain(num_workers=workers, max_epoch=2)
    fit(task, resumed, data(), tmp_path / "b", resume="latest")
    _assert_same_weights(full, resumed)
