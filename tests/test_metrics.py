import json
import shutil

import numpy as np
import pytest
import torch

from blip.evaluation.metrics import (accuracy, caption_scores, normalize_answer, question_accuracy,
                          retrieval_recall, vqa_accuracy)

# ----------------------------------------------------------------------------- retrieval recall

# 4 images, 12 captions; image 2 has four captions, image 3 two.
IMG2TXT = {0: [0, 1, 2], 1: [3, 4, 5], 2: [6, 7, 8, 11], 3: [9, 10]}
TXT2IMG = {t: i for i, ts in IMG2TXT.items() for t in ts}


def _row(n, positions):
    """Scores over n items putting item k at rank positions[k]; the others fill the gaps in order."""
    order = [None] * n
    for item, pos in positions.items():
        order[pos] = item
    rest = iter(i for i in range(n) if i not in positions)
    order = [next(rest) if o is None else o for o in order]
    row = np.zeros(n)
    row[order] = np.arange(n, 0, -1)  # descending: position 0 gets the highest score
    return row


def _scores():
    # Best caption rank per image: 0 (R@1), 3 (R@5), 7 (R@10), 10 (miss) -> TR 25 / 50 / 75.
    i2t = np.stack([_row(12, {1: 0, 0: 4, 2: 6}),
                    _row(12, {5: 3, 3: 8, 4: 10}),
                    _row(12, {7: 7, 6: 8, 8: 9, 11: 11}),
                    _row(12, {9: 10, 10: 11})])
    # Rank of each caption's image: 8 of 12 at rank 0, all below 5 -> IR 66.67 / 100 / 100.
    ranks = [0, 0, 1, 0, 2, 0, 3, 0, 0, 1, 0, 0]
    t2i = np.stack([_row(4, {TXT2IMG[t]: r}) for t, r in enumerate(ranks)])
    return i2t, t2i


def test_retrieval_recall_hand_worked():
    i2t, t2i = _scores()
    r = retrieval_recall(i2t, t2i, TXT2IMG, IMG2TXT)
    expected = dict(txt_r1=25.0, txt_r5=50.0, txt_r10=75.0, txt_r_mean=50.0,
                    img_r1=200 / 3, img_r5=100.0, img_r10=100.0, img_r_mean=(200 / 3 + 200) / 3)
    expected["r_mean"] = (expected["txt_r_mean"] + expected["img_r_mean"]) / 2
    assert r.keys() == expected.keys()
    for k, v in expected.items():
        assert r[k] == pytest.approx(v), k
    assert r["r_mean"] == pytest.approx(69.4444444)


def test_retrieval_recall_accepts_tensors_and_lists():
    i2t, t2i = _scores()
    ref = retrieval_recall(i2t, t2i, TXT2IMG, IMG2TXT)
    got = retrieval_recall(torch.tensor(i2t, dtype=torch.bfloat16), torch.tensor(t2i),
                           [TXT2IMG[t] for t in range(12)], [IMG2TXT[i] for i in range(4)])
    assert got == pytest.approx(ref)


# ----------------------------------------------------------------------------- VQA accuracy

@pytest.mark.parametrize("raw, norm", [
    ("Two", "2"), ("a dog", "dog"), ("yes.", "yes"), ("The Three dogs", "3 dogs"),
    ("none", "0"), ("dont know", "don't know"), ("black/white", "black white"),
    ("black / white", "black white"), ("well, yes", "well yes"), ("1,000", "1000"),
    ("3.5", "3.5"), ("  an apple\n", "apple"), ("yes!", "yes"),
])
def test_normalize_answer_official_rules(raw, norm):
    assert normalize_answer(raw) == norm


def test_vqa_accuracy_leave_one_out_averaging():
    # k matching annotators of 10: each of the 10 subsets of 9 holds k-1 (annotator left out
    # matched) or k matches; mean of min(1, m/3): k=1 -> 9*(1/3)/10 = 0.3; k=2 -> (2*(1/3) +
    # 8*(2/3))/10 = 0.6; k=3 -> (3*(2/3) + 7)/10 = 0.9; k=4 -> 1.
    def gts(k):
        return ["cat"] * k + ["dog"] * (10 - k)
    for k, acc in [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)]:
        assert question_accuracy("cat", gts(k)) == pytest.approx(acc), k
    assert vqa_accuracy(["cat"] * 4, [gts(k) for k in (1, 2, 3, 4)]) == pytest.approx(70.0)


def test_vqa_accuracy_normalises_the_prediction():
    assert vqa_accuracy(["Two", "a dog", "yes."], [["2"] * 10, ["dog"] * 10, ["yes"] * 10]) == 100.0
    # "TWO" -> "2", which only one annotator said -> 0.3
    assert question_accuracy("TWO", ["2"] + ["3"] * 9) == pytest.approx(0.3)


def test_vqa_ground_truth_processing_is_the_official_one():
    # Differing answers get their punctuation processed: "red-white" -> "red white".
    assert question_accuracy("red white", ["red-white"] * 3 + ["red white"] * 7) == 1.0
    # Identical answers are used as they are (the official data is normalised beforehand) ...
    assert question_accuracy("2", ["Two"] * 10) == 0.0
    # ... unless asked to normalise raw ground truth fully.
    assert question_accuracy("2", ["Two"] * 10, normalize_gt=True) == 1.0
    with pytest.raises(ValueError):
        vqa_accuracy(["a"], [["a"] * 10, ["b"] * 10])


def test_accuracy():
    assert accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 50.0
    assert accuracy(torch.tensor([1, 0, 1]), torch.tensor([1, 0, 1])) == 100.0
    with pytest.raises(ValueError):
        accuracy([1, 0], [1])


# ----------------------------------------------------------------------------- caption scores

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="PTB tokenizer needs Java")

GTS = {
    1: ["A dog runs along the beach.", "a brown dog running on sand", "Dog on a beach"],
    2: ["a cat sitting on a sofa", "The cat sits on the couch.", "a grey cat on a red sofa"],
    3: ["two people riding bikes down a street", "Cyclists on a city road", "people on bicycles"],
}
RESULTS = [{"image_id": 1, "caption": "a dog running on the beach"},
           {"image_id": 2, "caption": "a cat on a red sofa."},
           {"image_id": 3, "caption": "A man riding a bike on the street"}]


@needs_java
def test_caption_scores_match_pycocoevalcap_scorers():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    got = caption_scores(RESULTS + [{"image_id": 1, "caption": "ignored duplicate"}], GTS,
                         meteor=False, spice=False)
    tok = PTBTokenizer()
    gts = tok.tokenize({i: [{"caption": c} for c in cs] for i, cs in GTS.items()})
    res = tok.tokenize({r["image_id"]: [{"caption": r["caption"]}] for r in RESULTS})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    assert [got[f"Bleu_{n}"] for n in range(1, 5)] == pytest.approx(bleu)
    assert got["CIDEr"] == pytest.approx(Cider().compute_score(gts, res)[0])
    assert got["ROUGE_L"] == pytest.approx(Rouge().compute_score(gts, res)[0])
    assert set(got) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"}


@needs_java
def test_caption_scores_from_coco_file_with_meteor(tmp_path):
    anns = [{"image_id": i, "id": 10 * i + j, "caption": c}
            for i, cs in GTS.items() for j, c in enumerate(cs)]
    gt_file = tmp_path / "gt.json"
    gt_file.write_text(json.dumps({"images": [{"id": i} for i in GTS], "annotations": anns}))
    # A caption equal to a reference scores 1 in BLEU and ROUGE-L after tokenisation.
    perfect = [{"image_id": i, "caption": cs[0]} for i, cs in GTS.items()]
    got = caption_scores(perfect, gt_file)
    assert [got[f"Bleu_{n}"] for n in range(1, 5)] == pytest.approx([1.0] * 4, abs=1e-6)
    assert got["ROUGE_L"] == pytest.approx(1.0)
    assert 0.5 < got["METEOR"] <= 1.0
    with pytest.raises(ValueError, match="no reference"):
        caption_scores([{"image_id": 99, "caption": "x"}], str(gt_file), meteor=False, spice=False)
