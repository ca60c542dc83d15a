"""COCO caption metrics: PTB tokenisation, then BLEU-1..4, METEOR, ROUGE-L, CIDEr (and SPICE).

pycocoevalcap's `COCOEvalCap.evaluate()` always runs SPICE, which downloads Stanford CoreNLP and
fails offline, so the scorers are run here one by one. Like the original BLIP evaluation, the
images scored are those of the results (each image once), against every reference caption.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence

log = logging.getLogger(__name__)
_spice_notice_given = False


def spice_available() -> bool:
    """True when SPICE's Stanford CoreNLP 3.6.0 jars are where pycocoevalcap looks for them."""
    import pycocoevalcap.spice as spice
    lib = os.path.join(os.path.dirname(spice.__file__), "lib")
    return all(os.path.exists(os.path.join(lib, f"stanford-corenlp-3.6.0{s}.jar")) for s in ("", "-models"))


def load_coco_gt(gt_file: str | os.PathLike) -> dict[int, list[str]]:
    """image_id -> reference captions from a COCO-format file ({images, annotations})."""
    with open(gt_file) as f:
        data = json.load(f)
    gts: dict[int, list[str]] = {img["id"]: [] for img in data.get("images", [])}
    for ann in data["annotations"]:
        gts.setdefault(ann["image_id"], []).append(ann["caption"])
    return gts


def caption_scores(results: Sequence[Mapping], gt: str | os.PathLike | Mapping[int, Sequence[str]], *,
                   meteor: bool = True, spice: bool | None = None) -> dict[str, float]:
    """Corpus scores (fractions, as pycocoevalcap reports them) of `[{image_id, caption}]`.

    gt: a COCO-format file (e.g. coco_karpathy_test_gt.json) or image_id -> list of captions.
    meteor: METEOR needs Java and takes ~10 s. spice: None = when its jars are present.
    Keys: Bleu_1..Bleu_4, METEOR, ROUGE_L, CIDEr, SPICE (those computed).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    gts_all = load_coco_gt(gt) if isinstance(gt, (str, os.PathLike)) else gt
    res: dict = {}
    for r in results:  # the original de-duplicates results by image_id, keeping the first
        res.setdefault(r["image_id"], [{"caption": r["caption"]}])
    if not res:
        raise ValueError("caption_scores: no results")
    missing = [i for i in res if i not in gts_all or not gts_all[i]]
    if missing:
        raise ValueError(f"caption_scores: {len(missing)} result image ids have no reference "
                         f"captions, e.g. {missing[:5]}")
    gts = {i: [{"caption": c} for c in gts_all[i]] for i in res}

    tokenizer = PTBTokenizer()  # Java; lower-cases and strips punctuation
    gts, res = tokenizer.tokenize(gts), tokenizer.tokenize(res)

    out = dict(zip(["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"], Bleu(4).compute_score(gts, res, verbose=0)[0]))
    if meteor:
        from pycocoevalcap.meteor.meteor import Meteor
        scorer = Meteor()  # a Java process
        out["METEOR"] = scorer.compute_score(gts, res)[0]
        del scorer  # its __del__ ends the Java process now rather than at interpreter exit
    out["ROUGE_L"] = Rouge().compute_score(gts, res)[0]
    out["CIDEr"] = Cider().compute_score(gts, res)[0]
    if spice is None:
        spice = spice_available()
        global _spice_notice_given
        if not spice and not _spice_notice_given:
            _spice_notice_given = True
            log.warning("SPICE skipped: the Stanford CoreNLP 3.6.0 jars are not in pycocoevalcap/spice/lib")
    if spice:
        from pycocoevalcap.spice.spice import Spice
        out["SPICE"] = Spice().compute_score(gts, res)[0]
    return {k: float(v) for k, v in out.items()}
