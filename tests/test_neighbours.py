"""NegCLIP's nearest-neighbour alternative images (`hard_negatives: {images: K}`): the exact top-K against a brute
force, the table from a folder of files with a broken one, the sampler's batches (anchors + partners, ranks,
resume, redraws), training with data workers and a kill in the middle, and the refusals."""
import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from blip.training import neighbours as N
from blip.data.datasets import read_image
from blip.tasks.retrieval import RetrievalTrainDataset
from blip.tasks.pretrain import WebDatasetShards
from blip.data.samplers import NeighbourSampler, ResumableSampler
from blip.training.engine import fit
from blip.tasks import RetrievalTask
from blip.data.transforms import test_transform as eval_transform
from tests._tiny import PairData, tiny_config, tiny_model
from tests.conftest import launch

ROOT = Path(__file__).resolve().parents[1]
OPT = "hard_negatives={images: 2}"


def _brute_force(feats, k, valid):
    out = []
    for i in range(len(feats)):
        if not valid[i]:
            out.append([])
            continue
        sims = [(float(feats[i] @ feats[j]), j) for j in range(len(feats)) if j != i and valid[j]]
        out.append([j for _, j in sorted(sims, key=lambda t: -t[0])[:k]])
    return out


def test_nearest_is_the_exact_top_k_without_itself_or_unreadable_images():
    torch.manual_seed(0)
    feats = torch.nn.functional.normalize(torch.randn(37, 5, dtype=torch.float64), dim=1)
    valid = torch.ones(37, dtype=torch.bool)
    valid[[3, 20]] = False
    for chunk in (4, 4096):  # across chunk borders and in one piece
        assert N.nearest(feats, 3, valid, chunk=chunk) == _brute_force(feats, 3, valid)
    assert N.nearest(feats[:3], 5) == _brute_force(feats[:3], 2, [True] * 3)  # k capped at the others


def write_gallery(root, n_images=10, captions=2, broken=None):
    """`n_images` PNGs in two colour families, `captions` Karpathy rows each; image `broken` is not an image."""
    root = Path(root)
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_images):
        path = root / "img" / f"{i}.png"
        if i == broken:
            path.write_bytes(b"not a png")
        else:
            g = torch.Generator().manual_seed(i)
            base = (200, 30, 30) if i % 2 else (30, 30, 200)
            noise = (torch.rand(16, 16, 3, generator=g) * 60).to(torch.uint8).numpy()
            Image.fromarray((noise + torch.tensor(base, dtype=torch.uint8).numpy() // 2).astype("uint8")).save(path)
        for c in range(captions):
            rows.append({"image": f"img/{i}.png", "caption": f"a picture number {i} caption {c}", "image_id": i})
    ann = root / "karpathy_train.json"
    ann.write_text(json.dumps(rows))
    return str(ann), str(root)


def _retrieval(*overrides, **kw):
    cfg = tiny_config(OPT, *overrides, **{**dict(task="retrieval", batch_size=4, max_epoch=2, queue_size=8,
                                                 init_lr=1e-3, num_workers=0, seed=2), **kw})
    return RetrievalTask(cfg), tiny_model(RetrievalTask, cfg)


def test_table_from_a_folder_of_files_with_a_broken_image(tmp_path):
    ann, root = write_gallery(tmp_path, n_images=10, captions=2, broken=7)
    task, model = _retrieval()
    data = RetrievalTrainDataset(ann, root, None)
    table = N.build(model, data, 2, eval_transform(32))
    assert table.images == [os.path.join(root, f"img/{i}.png") for i in range(10)]
    assert table.row_image == [r // 2 for r in range(20)] and table.image_rows()[3] == [6, 7]
    assert table.unreadable == [table.images[7]] and table.neighbours[7] == []
    model.eval()
    with torch.no_grad():  # the model's own ITC features of the readable images, one by one
        feats = torch.zeros(10, model.image_features(torch.zeros(1, 3, 32, 32))[1].shape[1])
        for i in range(10):
            if i != 7:
                feats[i] = model.image_features(eval_transform(32)(read_image(table.images[i]))[None])[1][0]
    valid = torch.tensor([i != 7 for i in range(10)])
    assert table.neighbours == _brute_force(feats, 2, valid)
    assert all(7 not in near and i not in near for i, near in enumerate(table.neighbours))


def _table():
    """12 rows, 6 images of 2 rows; each image's neighbours are fixed by hand."""
    near = [[1, 2], [0, 2], [3, 0], [2, 4], [5, 3], []]  # image 5 unreadable
    return N.NeighbourTable(2, [f"{i}.png" for i in range(6)], [r // 2 for r in range(12)], near, ["5.png"])


def test_sampler_puts_each_anchor_beside_a_row_of_one_of_its_neighbours():
    table = _table()
    one = list(NeighbourSampler(12, 3, table, seed=4))
    assert len(one) == 4 * 6  # 12 // 3 global batches of 3 anchors + 3 partners
    anchors = [r for j in range(4) for r in one[6 * j:6 * j + 3]]
    assert anchors == list(ResumableSampler(12, 3, seed=4))  # the anchors: the plain sampler's order
    rows = table.image_rows()
    for j in range(4):
        for a, p in zip(one[6 * j:6 * j + 3], one[6 * j + 3:6 * j + 6]):
            near = table.neighbours[table.row_image[a]]
            assert (p in [r for i in near for r in rows[i]]) if near else 0 <= p < 12
    # two ranks of batch 3 take the anchors of one process of batch 6, each with its own partners
    big = list(NeighbourSampler(12, 6, table, seed=4))
    r0 = list(NeighbourSampler(12, 3, table, world=2, rank=0, seed=4))
    r1 = list(NeighbourSampler(12, 3, table, world=2, rank=1, seed=4))
    for j in range(2):
        assert sorted(big[12 * j:12 * j + 12]) == sorted(r0[6 * j:6 * j + 6] + r1[6 * j:6 * j + 6])
    # resume: start_batch skips whole micro-batches; the same epoch draws the same partners, another redraws
    s = NeighbourSampler(12, 3, table, seed=4)
    s.set_epoch(0, start_batch=2)
    assert list(s) == one[12:] and len(s) == 12
    draws = set()
    for epoch in range(8):
        s.set_epoch(epoch)
        draws.add(tuple(list(s)[3:6]))
    assert len(draws) > 1


class _Recorder(RetrievalTask):
    """Retrieval, recording every micro-batch's image indices."""
    seen: list = []

    def losses(self, forward, batch, progress):
        type(self).seen.append(batch.idx.tolist())
        return super().losses(forward, batch, progress)


@pytest.mark.parametrize("accum", [1, 2])
def test_training_pairs_each_anchor_and_resumes_with_the_saved_table(tmp_path, monkeypatch, accum):
    ann, root = write_gallery(tmp_path / "data", n_images=8, captions=2)  # (a broken image: the tests above)
    _, model = _retrieval()
    data = RetrievalTrainDataset(ann, root, eval_transform(32))
    _Recorder.seen = []
    task = _Recorder(tiny_config(OPT, task="retrieval", batch_size=4, max_epoch=2, queue_size=8, init_lr=1e-3,
                                 num_workers=2, seed=2, grad_accum_steps=accum))
    fit(task, model, data, tmp_path / "a")
    table = json.loads((tmp_path / "a" / N.FILE).read_text())
    assert table["k"] == 2 and table["unreadable"] == [] and len(table["images"]) == 8
    assert len(_Recorder.seen) == 2 * 4 and all(len(b) == 8 for b in _Recorder.seen)  # 4 anchors + 4 partners
    for b in _Recorder.seen:  # a readable anchor's partner shows one of its neighbour images (idx = image index)
        for a, p in zip(b[:4], b[4:]):
            assert p in table["neighbours"][a], (a, p)

    # killed after 3 optimizer steps (with accum 2: inside epoch 1), resumed in a new process: the table is read
    # back (never rebuilt) and the weights are those of one uninterrupted run
    task_b, part = _retrieval(save_every_steps=1, num_workers=2, grad_accum_steps=accum)
    fit(task_b, part, data, tmp_path / "b", max_steps=3)
    monkeypatch.setattr(N, "build", lambda *a, **k: pytest.fail("the table was rebuilt on resume"))
    task_c, resumed = _retrieval(num_workers=0, grad_accum_steps=accum)
    fit(task_c, resumed, data, tmp_path / "b", resume="latest")
    task_d, full = _retrieval(num_workers=0, grad_accum_steps=accum)
    monkeypatch.undo()
    fit(task_d, full, data, tmp_path / "c")
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_two_gloo_ranks_build_the_table_of_one_process(tmp_path):
    ann, root = write_gallery(tmp_path / "data", n_images=8, captions=2, broken=3)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    worker = ROOT / "tests" / "_ddp_worker.py"
    launch(worker, "neighbours", tmp_path / "one", 4, tmp_path / "data", env=env)
    launch(worker, "neighbours", tmp_path / "two", 2, tmp_path / "data", nproc=2, env=env)
    one, two = (json.loads((tmp_path / d / N.FILE).read_text()) for d in ("one", "two"))
    assert one == two and one["neighbours"][3] == []
    rows = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["event"] == "train" for r in rows)


def test_refusals(tmp_path):
    with pytest.raises(ValueError, match="hard_negatives.images must be an integer"):
        tiny_config("hard_negatives={images: -1}", task="retrieval")
    with pytest.raises(ValueError, match="did you mean 'images'"):
        tiny_config("hard_negatives={image: 3}", task="pretrain")
    with pytest.raises(ValueError, match="'hard_negatives': task 'caption' has no such key"):
        tiny_config(OPT, task="caption")  # captioning has no contrastive or matching loss to take them
    task, model = _retrieval()
    with pytest.raises(ValueError, match="PairData does not name its images"):
        fit(task, model, PairData(16, "retrieval"), tmp_path / "a")
    shards = WebDatasetShards(str(tmp_path / "x-{000000..000001}.tar"), None)
    with pytest.raises(ValueError, match="a stream of shards cannot fetch"):
        N.dataset_images(shards)


def test_resume_into_another_folder_reads_the_table_beside_the_checkpoint_and_a_stale_one_is_replaced(tmp_path, monkeypatch):
    ann, root = write_gallery(tmp_path / "data", n_images=8, captions=2)
    data = RetrievalTrainDataset(ann, root, eval_transform(32))
    task, model = _retrieval(save_every_steps=1)
    fit(task, model, data, tmp_path / "a", max_steps=2)
    monkeypatch.setattr(N, "build", lambda *a, **k: pytest.fail("the table was rebuilt on resume"))
    task, resumed = _retrieval()
    fit(task, resumed, data, tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint_latest.pt"))
    # read from a/, where the run began, and kept in b/ for the next resume from b/
    assert json.loads((tmp_path / "b" / N.FILE).read_text()) == json.loads((tmp_path / "a" / N.FILE).read_text())
    task, again = _retrieval()
    fit(task, again, data, tmp_path / "b", resume="latest")
    # a stale table of other images in the run folder is replaced, not used
    stale = json.loads((tmp_path / "b" / N.FILE).read_text())
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / N.FILE).write_text(json.dumps({**stale, "images": stale["images"][::-1]}))
    monkeypatch.undo()
    task, fresh = _retrieval()
    fit(task, fresh, data, tmp_path / "c", max_steps=1)
    assert json.loads((tmp_path / "c" / N.FILE).read_text()) == stale
