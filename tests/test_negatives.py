"""Hard negative captions (NegCLIP): generated correctly, and the losses that use them against hand computations;
with the option off, the losses are today's."""
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from blip.training.config import load_config
from blip.models.losses import itc_loss
from blip.data.negatives import OPPOSITES, SHAPES_WORDS, caption_negatives, caption_sampler, lexicon_tagger, shapes_tagger
from blip.tasks import PretrainTask, RetrievalTask
from data import shapes
from data.shapes_probes import pair_captions, sample_pair
from tests._tiny import tiny_config, tiny_model

REAL = ["a man riding a brown horse on the beach next to a white dog",
        "two dogs playing with a red ball in the grass",
        "a small cat sitting on top of a wooden table to the left of a laptop",
        "a woman quickly walking under a large umbrella"]


def _only_swapped_parts(caption, neg):
    """The negative equals the caption outside its spans; inside, the spans are exchanged (or one word flipped)."""
    tokens, words = caption.split(), neg.text.split()
    assert neg.text != caption
    assert len(words) == len(tokens)
    if neg.kind == "phrase":
        (s0, e0), (s1, e1) = neg.spans
        assert words == tokens[:s0] + tokens[s1:e1] + tokens[e0:s1] + tokens[s0:e0] + tokens[e1:]
    elif neg.kind == "relation" and len(neg.spans) == 1:
        (i, _), = neg.spans
        assert words[:i] + words[i + 1:] == tokens[:i] + tokens[i + 1:]
        assert words[i] == OPPOSITES[tokens[i]]
    else:
        (i, _), (j, _) = neg.spans
        assert [k for k in range(len(tokens)) if words[k] != tokens[k]] == [i, j]
        assert (words[i], words[j]) == (tokens[j], tokens[i])


def test_negatives_differ_only_in_swapped_parts():
    rng = np.random.default_rng(0)
    captions = [c for _ in range(40)
                for c in pair_captions(sample_pair(rng)) + shapes.captions(shapes.sample_scene(rng))]
    n = 0
    for caption in captions:
        for neg in caption_negatives(caption, shapes_tagger):
            _only_swapped_parts(caption, neg)
            n += 1
    for caption in REAL:
        negs = caption_negatives(caption, lexicon_tagger)
        assert negs and len({x.text for x in negs}) == len(negs)
        for neg in negs:
            _only_swapped_parts(caption, neg)
    assert n > 200


def test_shapes_negatives_swap_like_with_like():
    got = {(n.kind, n.text) for n in caption_negatives("a red circle to the left of a blue square", shapes_tagger)}
    assert got == {("attribute", "a blue circle to the left of a red square"),   # binding
                   ("object", "a red square to the left of a blue circle"),
                   ("phrase", "a blue square to the left of a red circle"),     # ARO's order swap
                   ("relation", "a red circle to the right of a blue square")}
    # one shape group: no colour or kind to exchange, only the position flipped
    assert [n.text for n in caption_negatives("a small red circle at the top", shapes_tagger)] == \
        ["a small red circle at the bottom"]
    assert caption_negatives("one green cross in the center", shapes_tagger) == []


def test_shapes_vocabulary_matches_the_world():
    words = {w for w, t in SHAPES_WORDS.items() if t not in ("DT", "NN-background")}
    world = (set(shapes.COLORS) | set(shapes.SIZES) | set(shapes.KINDS) | set(shapes.PLURAL.values())
             | set(shapes.NUMBER.values()) | set(shapes.BACKGROUNDS))
    assert words == world


def test_lexicon_tagger_on_a_caption():
    tags = lexicon_tagger("a man riding a brown horse on the beach next to a building".split())
    assert tags == ["DT", "NN", "VBG", "DT", "JJ", "NN", "IN", "DT", "NN", "IN", "IN", "DT", "NN"]


def test_option_refused_when_misspelled():
    with pytest.raises(ValueError, match="did you mean 'captions'"):
        load_config(None, ["task=retrieval", "hard_negatives={captoins: 2}"])
    with pytest.raises(ValueError, match="unknown tagger"):
        load_config(None, ["task=pretrain", "hard_negatives={captions: 2, tagger: nltk}"])
    with pytest.raises(ValueError, match="integer >= 0"):
        load_config(None, ["task=retrieval", "hard_negatives={captions: -1}"])
    assert load_config(None, ["task=retrieval", "hard_negatives.captions=2"]).options.hard_negatives == {"captions": 2}


def test_itc_with_negative_captions_matches_hand_loop():
    g = torch.Generator().manual_seed(0)
    unit = lambda *s: F.normalize(torch.randn(*s, generator=g), dim=-1)
    img, txt, img_m, txt_m = unit(2, 3), unit(2, 3), unit(2, 3), unit(2, 3)
    iq, tq = unit(3, 3).t(), unit(3, 3).t()
    neg, neg_m = unit(4, 3), unit(4, 3)  # 4 hard captions in the batch
    temp, alpha = 0.5, 0.4
    pos = torch.eye(2, 5)
    loss, _, _ = itc_loss(img, txt, img_m, txt_m, image_queue=iq, text_queue=tq, temp=temp, alpha=alpha, pos=pos,
                          neg_text_feat=neg, neg_text_feat_m=neg_m)

    def direction(q, q_m, keys, keys_m, n_cols):
        total = 0.0
        for r in range(2):
            sims = [float(q[r] @ k) / temp for k in keys]
            sims_m = [float(q_m[r] @ k) / temp for k in keys_m]
            z, z_m = sum(math.exp(s) for s in sims), sum(math.exp(s) for s in sims_m)
            for c in range(n_cols):
                target = alpha * math.exp(sims_m[c]) / z_m + (1 - alpha) * (1.0 if c == r else 0.0)
                total -= target * (sims[c] - math.log(z))
        return total / 2

    # image -> text: momentum texts + queue, then the hard captions (online features in the logits, momentum ones
    # in the distillation targets); text -> image unchanged
    keys_t = list(txt_m) + list(tq.t())
    i2t = direction(img, img_m, keys_t + list(neg), keys_t + list(neg_m), 9)
    t2i = direction(txt, txt_m, list(img_m) + list(iq.t()), list(img_m) + list(iq.t()), 5)
    assert loss.item() == pytest.approx((i2t + t2i) / 2, abs=1e-5)
    # the hard captions only make image -> text harder
    assert loss.item() > itc_loss(img, txt, img_m, txt_m, image_queue=iq, text_queue=tq, temp=temp, alpha=alpha, pos=pos)[0].item()


def _batch(n=4, size=32):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, size, size, generator=g)


CAPS = ["a red circle to the left of a blue square", "a green cross and a yellow triangle",
        "two small red circles at the top", "one green cross in the center"]


def test_itm_gains_one_row_per_image_with_negatives():
    cfg = tiny_config("queue_size=8")
    model = tiny_model(RetrievalTask, cfg)
    model.eval()
    negs = [["a blue circle to the left of a red square"], ["a yellow cross and a green triangle"],
            ["two small red circles at the bottom"], []]
    fixed = (torch.tensor([1, 0, 3, 2]), torch.tensor([2, 3, 0, 1]))
    out = model.losses(_batch(), CAPS, idx=[0, 1, 2, 3], hard_negatives=fixed, update_queue=False,
                       negative_captions=negs)
    # by hand: 4 positives, 8 in-batch negatives, then (its hard caption, image i) for images 0, 1, 2
    with torch.no_grad():
        embeds = model.visual_encoder(_batch())
        ids, mask = model.tokenize(CAPS, max_length=35, first_token=model.itm_first_token)
        def row(image, text_ids, text_mask):
            return model.itm_logits(embeds[image][None], text_ids[None], text_mask[None])
        neg_image, neg_text = fixed[0].tolist(), fixed[1].tolist()
        logits = [row(i, ids[i], mask[i]) for i in range(4)]
        logits += [row(neg_image[i], ids[i], mask[i]) for i in range(4)]
        logits += [row(i, ids[neg_text[i]], mask[neg_text[i]]) for i in range(4)]
        for i in range(3):
            n_ids, n_mask = model.tokenize(negs[i], max_length=35, first_token=model.itm_first_token)
            logits.append(row(i, n_ids[0], n_mask[0]))
        labels = torch.tensor([1] * 4 + [0] * 11)
        expected = F.cross_entropy(torch.cat(logits).float(), labels)
    assert out["loss_itm"].item() == pytest.approx(expected.item(), abs=1e-5)


@pytest.mark.parametrize("task_cls", [RetrievalTask, PretrainTask])
def test_option_off_gives_todays_losses(task_cls):
    from blip.training.engine import Progress
    for off in (None, {"captions": 0}):
        cfg = tiny_config("queue_size=8", task=task_cls.names[0])
        cfg.options.hard_negatives = off
        task = task_cls(cfg)
        assert caption_sampler(cfg.options.hard_negatives) is None
        progress = Progress(epoch=3, step=0, steps_per_epoch=10)  # past the alpha ramps
        samples = [(img, c, i) if task_cls is RetrievalTask else (img, c) for i, (img, c) in enumerate(zip(_batch(), CAPS))]
        results = []
        for via_task in (True, False):
            model = tiny_model(task_cls, cfg)
            torch.manual_seed(5)  # the ITM negatives' draw
            if via_task:  # the training path: the task's collate, its losses
                out = task.losses(model, task.collate(model)(samples, list(range(4))), progress)
            else:  # the losses as they were called before the option existed
                kw = {"idx": [0, 1, 2, 3]} if task_cls is RetrievalTask else {}
                out = model.losses(_batch(), CAPS, alpha=cfg.options.alpha, **kw)
            results.append({k: v.item() for k, v in out.items()})
        assert results[0] == results[1]


def test_training_negatives_are_drawn_per_sample_seed():
    """A caption's hard captions in training depend on its sample's seed alone (not on the batch, worker or rank),
    so a resumed run draws the same; another seed (epoch) draws anew."""
    cfg = tiny_config("hard_negatives={captions: 2, tagger: shapes}", task="retrieval", queue_size=8)
    task = RetrievalTask(cfg)
    collate = task.collate(tiny_model(RetrievalTask, cfg))
    samples = [(img, c, i) for i, (img, c) in enumerate(zip(_batch(), CAPS))]
    sampler = caption_sampler(cfg.options.hard_negatives)

    def drawn(batch):
        rows = batch.neg_owner.tolist()
        texts = [t.replace(" ", "") for t in collate_texts(batch)]
        return [[t for r, t in zip(rows, texts) if r == i] for i in range(len(CAPS))]

    a = collate(samples, [11, 12, 13, 14])
    assert [len(x) for x in drawn(a)] == [2, 2, 1, 0]  # as many as each caption has, at most 2
    for caption, negs in zip(CAPS, drawn(a)):
        assert set(negs) <= {n.text.replace(" ", "") for n in caption_negatives(caption, shapes_tagger)}
    # the same seeds give the same draws in another batch order (another worker or rank); the rows that have one
    b = collate(samples[::-1], [14, 13, 12, 11])
    assert drawn(b) == drawn(a)[::-1] and a.neg_rows.tolist() == [0, 1, 2]
    assert a.neg_weights.tolist() == [[1, 1, 0, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 1]]  # each row: its own
    draws = {tuple(sampler(CAPS[0], random.Random(f"negatives:{s}"))) for s in range(20)}
    assert len(draws) > 1  # another seed, another draw


def collate_texts(batch):
    from blip.data.tokenizer import decode
    return [decode(ids.tolist()) for ids in batch.neg_ids]


def test_negative_captions_enter_itc_with_gradient():
    """The mechanism in the model: loss_ita with hard captions = itc_loss on the model's own features with those
    captions as extra image->text columns, and the text encoder gets gradient through them (online features)."""
    cfg = tiny_config("queue_size=8")
    model = tiny_model(RetrievalTask, cfg)
    model.eval()
    negs = [["a blue circle to the left of a red square"], [], ["two small red circles at the bottom"], []]
    out = model.losses(_batch(), CAPS, idx=[0, 1, 2, 3], alpha=0.4, update_queue=False, negative_captions=negs)
    with torch.no_grad():
        _, img = model.image_features(_batch())
        ids, mask, txt = model.text_features(CAPS)
        img_m, txt_m = model.momentum_features(_batch(), ids, mask)
        n_ids, n_mask, n_feat = model.text_features([negs[0][0], negs[2][0]])
        n_feat_m = F.normalize(model.text_proj_m(model.text_encoder_m(n_ids, n_mask)[:, 0]), dim=-1)
        pos = torch.eq(torch.arange(4)[:, None], torch.cat([torch.arange(4), model.idx_queue[0]])[None]).float()
        expected = itc_loss(img, txt, img_m, txt_m, image_queue=model.image_queue, text_queue=model.text_queue,
                            temp=model.temp, alpha=0.4, pos=pos, neg_text_feat=n_feat, neg_text_feat_m=n_feat_m)[0]
        plain = itc_loss(img, txt, img_m, txt_m, image_queue=model.image_queue, text_queue=model.text_queue,
                         temp=model.temp, alpha=0.4, pos=pos)[0]
    assert out["loss_ita"].item() == pytest.approx(expected.item(), abs=1e-5)
    assert out["loss_ita"].item() > plain.item()
    # the text encoder learns from them: "bottom" is only in a hard caption, and its embedding gets gradient
    from blip.data.tokenizer import get_tokenizer
    row = get_tokenizer().convert_tokens_to_ids("bottom")
    grads = []
    for n in (None, negs):
        model.zero_grad()
        model.losses(_batch(), CAPS, idx=[0, 1, 2, 3], update_queue=False, negative_captions=n)["loss_ita"].backward()
        grads.append(model.text_encoder.embeddings.word_embeddings.weight.grad[row].abs().sum().item())
    assert grads[0] == 0 and grads[1] > 0
