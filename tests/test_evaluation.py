"""The evaluators: 2 gloo ranks give what one rank gives (retrieval metrics, caption results); caption, VQA
and NLVR2 scoring on hand-made sets with known answers."""
import json
import textwrap
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

from blip.training.config import load_config
from blip.evaluation.loops import evaluate_caption, evaluate_nlvr, evaluate_vqa
from blip.models.generation import Decoding
from tests.conftest import launch

ROOT = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent("""
    import json, sys, torch
    sys.path.insert(0, sys.argv[2])
    import blip
    from blip import distributed as dist
    from blip.evaluation.loops import evaluate_caption, evaluate_retrieval
    from blip.models.generation import Decoding

    SIZES = dict(image_size=32, patch_size=8, vision_width=32, vision_depth=1, vision_heads=2, embed_dim=16,
                 med_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))

    class Gallery(torch.utils.data.Dataset):  # 7 images, 3 captions each (odd sizes: uneven rank shares)
        words = "red blue green circle square left right small large two one the a on".split()

        def __init__(self):
            g = torch.Generator().manual_seed(0)
            self.images = torch.randn(7, 3, 32, 32, generator=g)
            self.text = [" ".join(self.words[(i * 5 + j * 3 + n) % 14] for n in range(4 + j)) for i in range(7)
                         for j in range(3)]
            self.txt2img = {t: t // 3 for t in range(21)}
            self.img2txt = {i: [3 * i, 3 * i + 1, 3 * i + 2] for i in range(7)}

        def __len__(self):
            return 7

        def __getitem__(self, i):
            return self.images[i], 100 + i

    rank, _, world, _ = dist.init_distributed("cpu")
    torch.manual_seed(0)
    retrieval = blip.load_model("retrieval", queue_size=8, **SIZES)
    torch.manual_seed(0)
    caption = blip.load_model("caption", **SIZES)
    gallery = Gallery()
    how = Decoding(max_length=8, min_length=3)
    out = {"world": world, "retrieval": evaluate_retrieval(retrieval, gallery, k_test=4, batch_size=2, rerank_batch=5),
           "captions": evaluate_caption(caption, gallery, how, result_file=sys.argv[1] + "/captions.json",
                                        batch_size=2),
           "training": retrieval.training}
    if dist.is_main():
        json.dump(out, open(sys.argv[1] + f"/world{world}.json", "w"))
    dist.cleanup()
""")


def test_two_ranks_evaluate_as_one(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    launch(script, tmp_path / "one", ROOT, cwd=tmp_path)
    captions_one = json.loads((tmp_path / "one" / "captions.json").read_text())
    launch(script, tmp_path / "two", ROOT, nproc=2, cwd=tmp_path)
    r1 = json.loads((tmp_path / "one" / "world1.json").read_text())
    r2 = json.loads((tmp_path / "two" / "world2.json").read_text())
    assert r2["world"] == 2 and r1["world"] == 1
    assert r2["retrieval"] == pytest.approx(r1["retrieval"], abs=1e-9)
    assert json.loads((tmp_path / "two" / "captions.json").read_text()) == captions_one
    assert [c["image_id"] for c in captions_one] == list(range(100, 107))
    assert r1["captions"] == {} and r2["training"] is False


# -- hand-made sets, models replaced by stubs with known outputs ----------------------------------------------
class Images(Dataset):
    """Image i is a constant tensor of value i; items (image, id) or, with questions, (image, question, qid)."""

    def __init__(self, ids, questions=None, ann=None):
        self.ids, self.questions, self.ann = ids, questions, ann

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        image = torch.full((3, 4, 4), float(i))
        return (image, self.ids[i]) if self.questions is None else (image, self.questions[i], self.ids[i])


class Stub(torch.nn.Module):
    """Answers from a table indexed by the image's value; records the generation arguments."""

    def __init__(self, table):
        super().__init__()
        self.table, self.kwargs, self.device = table, [], torch.device("cpu")

    def _rows(self, images):
        return [self.table[int(v)] for v in images[:, 0, 0, 0]]

    def generate(self, images, how=None, **kw):
        self.kwargs.append(kw if how is None else how)
        return self._rows(images)

    def answer(self, images, questions, **kw):
        self.kwargs.append(kw)
        return self._rows(images)

    def predict(self, image0, image1, sentences):
        return torch.tensor(self._rows(image0))


def test_caption_evaluator_scores_results_against_coco_ground_truth(tmp_path):
    refs = {11: ["a red circle on the left", "one red circle"], 12: ["two blue squares at the top", "blue squares"],
            13: ["a green triangle in the center", "one green triangle"]}
    gt = {"images": [{"id": i} for i in refs],
          "annotations": [{"image_id": i, "caption": c, "id": n} for n, (i, c) in
                          enumerate((i, c) for i, cs in refs.items() for c in cs)]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    cfg = load_config(None, ["task=caption", "batch_size=2", "num_workers=0", "num_beams=4", "max_length=11",
                             "min_length=2", "repetition_penalty=1.1", "meteor=false"])
    how, kw = cfg.options.decoding(), dict(batch_size=cfg.test_batch_size, meteor=cfg.options.meteor)
    stub = Stub({0: "a red circle on the left", 1: "two blue squares at the top", 2: "a green triangle in the center"})
    scores = evaluate_caption(stub, Images([11, 12, 13]), how, tmp_path / "gt.json", tmp_path / "res.json", **kw)
    assert json.loads((tmp_path / "res.json").read_text()) == [
        {"image_id": 11, "caption": "a red circle on the left"},
        {"image_id": 12, "caption": "two blue squares at the top"},
        {"image_id": 13, "caption": "a green triangle in the center"}]
    assert stub.kwargs[0] == Decoding(num_beams=4, max_length=11, min_length=2, repetition_penalty=1.1)
    assert scores["Bleu_1"] == pytest.approx(1.0) and scores["Bleu_4"] == pytest.approx(1.0)
    assert "METEOR" not in scores and scores["CIDEr"] > 1.0

    wrong = Stub({0: "two blue squares at the top", 1: "a red circle on the left", 2: "a green triangle in the center"})
    assert evaluate_caption(wrong, Images([11, 12, 13]), how, tmp_path / "gt.json", **kw)["CIDEr"] < scores["CIDEr"] / 2


def test_vqa_evaluator_writes_results_and_official_accuracy(tmp_path):
    ann = [{"question_id": 7, "answer": ["yes"] * 10}, {"question_id": 8, "answer": ["2"] * 2 + ["3"] * 8},
           {"question_id": 9, "answer": ["blue"] * 10}]
    data = Images([7, 8, 9], questions=["is it?", "how many?", "what color?"], ann=ann)
    cfg = load_config(None, ["task=vqa", "batch_size=2", "num_workers=0", "inference=rank", "k_test=5"])
    kw = dict(method=cfg.options.inference, k=cfg.options.k_test, batch_size=cfg.test_batch_size)
    stub = Stub({0: "yes", 1: "two", 2: "red"})  # "two" is normalised to "2"
    out = evaluate_vqa(stub, data, ["yes", "2", "red"], tmp_path / "vqa_result.json", **kw)
    # q7: 1; q8: 2 annotators of 10 agree -> mean over leave-one-out of min(1, n/3) = (2 * 1/3 + 8 * 2/3) / 10 = 0.6
    assert out["acc"] == pytest.approx(100 * (1 + 0.6 + 0) / 3)
    assert json.loads((tmp_path / "vqa_result.json").read_text()) == [
        {"question_id": 7, "answer": "yes"}, {"question_id": 8, "answer": "two"}, {"question_id": 9, "answer": "red"}]
    assert stub.kwargs[0] == dict(method="rank", answer_list=["yes", "2", "red"], k=5)

    test_dev = Images([7, 8, 9], questions=["a?", "b?", "c?"], ann=[{"question_id": q} for q in (7, 8, 9)])
    assert evaluate_vqa(stub, test_dev, ["yes"], **kw) == {}  # no answers: the server scores the result file


def test_nlvr_evaluator_accuracy():
    class Pairs(Dataset):
        labels = [1, 0, 1, 1, 0]

        def __len__(self):
            return 5

        def __getitem__(self, i):
            return torch.full((3, 4, 4), float(i)), torch.zeros(3, 4, 4), f"sentence {i}", self.labels[i]

    stub = Stub({0: 1, 1: 0, 2: 0, 3: 1, 4: 1})  # 3 of 5 right
    assert evaluate_nlvr(stub, Pairs(), batch_size=2) == {"acc": pytest.approx(60.0)}


@pytest.mark.parametrize("index", [[0, 0, 0, 1, 1, 1], [0, 1, 1, 2, 2, 2], [2, 0, 1, 0, 2, 1]])
def test_itm_with_shared_image_kv_equals_one_image_per_row(index):
    """Re-ranking projects each image's cross-attention K/V once for all its texts: grouped rows (equal runs,
    read in place), uneven runs and unsorted rows (gathered) must all give the per-row ITM logits."""
    import blip
    torch.manual_seed(0)
    model = blip.load_model("retrieval", image_size=32, patch_size=8, vision_width=32, vision_depth=1,
                            vision_heads=2, embed_dim=16, queue_size=8,
                            med_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                            intermediate_size=64)).eval()
    image_embeds = model.visual_encoder(torch.randn(3, 3, 32, 32))
    ids, mask = model.tokenize(["a red circle", "two blue squares on the left", "one", "a b c d", "x y", "z"])
    index = torch.tensor(index)
    with torch.no_grad():
        per_row = model.itm_logits(image_embeds[index], ids, mask)
        shared = model.itm_logits(image_embeds, ids, mask, image_index=index)
    torch.testing.assert_close(shared, per_row, atol=1e-5, rtol=1e-5)


def test_feature_spread_is_the_mean_pairwise_cosine_and_names_a_collapsed_tower(caplog):
    from blip.evaluation.loops import feature_spread, mean_cosine
    feat = torch.nn.functional.normalize(torch.randn(9, 5, generator=torch.Generator().manual_seed(0)), dim=-1)
    sims = feat @ feat.t()
    by_hand = (sims.sum() - sims.diagonal().sum()) / (9 * 8)
    assert mean_cosine(feat) == pytest.approx(by_hand.item(), abs=1e-6)
    one = torch.nn.functional.normalize(torch.ones(6, 5), dim=-1)
    with caplog.at_level("WARNING"):
        out = feature_spread(feat, one)
    assert out["text_feat_cosine"] == pytest.approx(1.0, abs=1e-6) and out["image_feat_cosine"] < 0.5
    assert "collapsed text features" in caplog.text and "collapsed image" not in caplog.text


def test_bf16_rerank_reorders_only_candidates_closer_than_its_rounding():
    """rerank_precision bf16: the re-ranked scores stay within bf16's rounding of fp32's, so a candidate pair can only
    trade places when fp32 had them closer than that; the ITC-chosen candidates are the same."""
    import blip
    torch.manual_seed(0)
    model = blip.load_model("retrieval", preset="tiny")
    with torch.no_grad():  # scores that differ between pairs
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(20, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    words = "a red blue green circle square two three left right big small on the of".split()
    g = torch.Generator().manual_seed(2)
    texts = [" ".join(words[i] for i in torch.randint(len(words), (6,), generator=g).tolist()) for _ in range(60)]
    fp32, bf16 = (model.retrieval_scores(x, texts, k_test=8, precision=p) for p in ("fp32", "bf16"))
    for a, b in zip(fp32, bf16):
        assert torch.equal(a > -100, b > -100)  # the same candidates re-ranked
        err = (a - b).abs().max().item()
        assert 0 < err < 0.05  # bf16 was used, and stays close
        differ = 0
        for row_a, row_b in zip(a, b):
            order = row_b.argsort(descending=True)[:8]
            inverted = row_a[order][:-1] < row_a[order][1:]  # fp32 disagrees with bf16's order of a neighbour pair
            differ += bool(inverted.any())
            assert ((row_a[order][1:] - row_a[order][:-1])[inverted] <= 2 * err).all()
        assert differ < len(a) // 2  # most rows keep fp32's order exactly (measured: 1 of 20, 1 of 60)
