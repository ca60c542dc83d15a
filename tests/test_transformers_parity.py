"""Parity with transformers' BLIP (5.23) on the same random weights, and the round trip through its layout.

transformers' classes are built from tiny configs (no hub), their weights are redrawn from a seeded rule
that makes every part matter (random LayerNorm gains and biases, logits that vary with image and position,
an [SEP] bias so that some captions end early and some run to max_length), and our model is made from
them with `blip.from_transformers`.

Beam search: transformers 5 is not the 4.15 that the original BLIP ran (and that we reproduce). With the
settings both use here (length_penalty 1.0, early_stopping False) their beam searches differ in two rules:

1. Beams still running at max_length. 4.15 adds them in `finalize` scored sum_logprobs / their full
   length (max_length, the [DEC] prompt included) and may take any of the `num_beams` running beams;
   5 treats max_length as a stopping criterion inside the step, so only the top `num_beams` candidates of
   the last step are finished, scored sum_logprobs / (max_length - prompt_len). Captions ended by [SEP]
   are scored alike by both: sum_logprobs / (tokens generated, [SEP] included) = / (len without [SEP]).
2. When to stop. Both stop an input once `num_beams` hypotheses are finished and the worst of them scores
   at least best / cur_len, but 4.15 takes `best` over all 2*num_beams candidates of the step ([SEP]
   candidates included, `BeamHypotheses.is_done(next_scores.max(), cur_len)`), 5 over the running beams only
   (`_check_early_stop_heuristic`, `running_beam_scores[:, :1]`). 5 may stop where 4.15 searches on.

`reference_beam_search` below is a plain, cache-free beam search over our decoder's log-probabilities with
these two rules as switches. The tests check that with transformers 5's rules it gives exactly
transformers' `generate` ids, with 4.15's rules exactly ours, and hence that ours equals transformers
wherever the two rule sets lead to the same caption (most inputs, both [SEP]-ended and truncated ones).
"""
import math
import re

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
from transformers import (BlipConfig, BlipForConditionalGeneration, BlipForImageTextRetrieval,  # noqa: E402
                          BlipForQuestionAnswering)

import blip  # noqa: E402
from blip.models.checkpoint import load_into  # noqa: E402
from blip.data.tokenizer import DEC_ID, ENC_ID, SEP_ID, decode, tokenize  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-4
IMAGE = 32
QUESTIONS = ["what is in the picture?", "how many dogs are there", "is it red?"]
TEXTS = ["a dog running on the beach", "two cats", "a red car parked next to a tree", "a picture"]



def tiny_config(vision_width=48, text_width=32, embed_dim=24):
    return BlipConfig(
        text_config=dict(vocab_size=30524, hidden_size=text_width, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=4 * text_width, max_position_embeddings=64,
                         encoder_hidden_size=vision_width,
                         label_smoothing=0.1),  # transformers' default is 0.0; the original's LM loss uses 0.1
        vision_config=dict(hidden_size=vision_width, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=4 * vision_width, image_size=IMAGE, patch_size=16,
                           initializer_range=0.02,  # the default 1e-10 makes every image look the same
                           layer_norm_eps=1e-5),  # not the ViT's 1e-6: from_transformers must read it
        image_text_hidden_size=embed_dim, attn_implementation="eager")


@torch.no_grad()
def randomize(hf, seed, eos_bias=0.0):
    """Redraw every parameter: matrices N(0, 1/fan_in), LayerNorm gains 1 + N(0, 0.1²), biases N(0, 0.1²),
    word embeddings std 0.3, position/class embeddings std 0.5; `eos_bias` is added to the LM bias of [SEP]."""
    g = torch.Generator().manual_seed(seed)
    for name, p in hf.named_parameters():
        r = torch.randn(p.shape, generator=g)
        if "word_embeddings" in name:
            v = 0.3 * r
        elif "embedding" in name:
            v = 0.5 * r
        elif p.dim() == 1 and "norm" in name.lower() and name.endswith("weight"):
            v = 1 + 0.1 * r
        elif p.dim() == 1:
            v = 0.1 * r
        else:
            v = r / math.sqrt(p[0].numel())
        p.copy_(v)
    if eos_bias and hasattr(hf, "text_decoder"):
        hf.text_decoder.cls.predictions.bias[SEP_ID] += eos_bias
    return hf.eval()


def make(cls, seed, eos_bias=0.0, **cfg):
    torch.manual_seed(seed)
    hf = randomize(cls(tiny_config(**cfg)), seed, eos_bias)
    ours = blip.from_transformers(hf)
    return hf, ours


def images(seed, n=4):
    return torch.randn(n, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1000 + seed))


def close(a, b, tol=TOL):
    assert a.shape == b.shape, (a.shape, b.shape)
    diff = (a.float() - b.float()).abs().max().item()
    assert diff <= tol, f"max abs difference {diff}"


def upto_eos(seq):
    """A generated sequence up to and including its first [SEP] (transformers pads after it)."""
    seq = list(seq)
    return seq[:seq.index(SEP_ID, 1) + 1] if SEP_ID in seq[1:] else seq


def reference_beam_search(logprobs, nb, max_length, min_length, hf5_rules):
    """Beam search for ONE input, starting from [DEC] (prompt length 1), length_penalty 1, no early stopping.

    logprobs(list of sequences) -> [n, vocab] next-token log-softmax. hf5_rules picks transformers 5's two
    rules (see the module docstring) instead of 4.15's; everything else is shared.
    """
    running, finished, done = [([DEC_ID], 0.0)], [], False
    while True:
        cur_len = len(running[0][0])
        lp = logprobs([s for s, _ in running])
        if cur_len < min_length:
            lp[:, SEP_ID] = -float("inf")
        total = (lp + torch.tensor([s for _, s in running])[:, None]).view(-1)
        vocab = lp.shape[1]
        top_s, top_i = total.topk(2 * nb)
        candidates = [(s, i % vocab, i // vocab) for s, i in zip(top_s.tolist(), top_i.tolist())]
        last_step = cur_len + 1 >= max_length
        nxt = []
        for rank, (score, tok, beam) in enumerate(candidates):
            seq = running[beam][0]
            if tok == SEP_ID or (hf5_rules and last_step):  # rule 1 (5): max_length finishes the top beams
                if rank < nb and not done:
                    finished.append((score / cur_len, seq + [tok]))
                    finished = sorted(finished, key=lambda h: -h[0])[:nb]
            elif len(nxt) < nb:
                nxt.append((seq + [tok], score))
        if len(finished) == nb and not done:  # rule 2: the best still attainable
            best = (nxt[0][1] if nxt else -1e9) if hf5_rules else candidates[0][0]
            done = finished[-1][0] >= best / cur_len
        if not hf5_rules and last_step and not done:  # rule 1 (4.15): finalize adds the running beams
            finished += [(score / len(seq), seq) for seq, score in nxt]
            finished = sorted(finished, key=lambda h: -h[0])[:nb]
        running = nxt
        if done or last_step:
            return finished[0][1]


# ---------------------------------------------------------------------------------------------- caption

def test_caption_vision_and_decoder_logits():
    hf, ours = make(BlipForConditionalGeneration, seed=0)
    load_into(ours, hf.state_dict(), strict=True)  # every transformers weight has its place, none left over
    assert ours.vision_cfg.layer_norm_eps == 1e-5
    x = images(0)
    ids, mask = tokenize(["a dog running", "two cats on a red sofa", "a", "the beach at night"], first_token=DEC_ID)
    with torch.no_grad():
        v_hf, v_ours = hf.vision_model(x).last_hidden_state, ours.visual_encoder(x)
        close(v_hf, v_ours)
        assert (v_ours[0] - v_ours[1]).abs().max() > 0.1  # images really differ
        l_hf = hf.text_decoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=v_hf).logits
        close(l_hf, ours.text_decoder(ids, mask, v_ours))
        # transformers' LM loss (label smoothing set to the original's 0.1; pads ignored) = ours
        labels = ids.masked_fill(mask == 0, -100)
        out = hf(pixel_values=x, input_ids=ids, attention_mask=mask, labels=labels)
        close(out.loss, ours.losses(x, ["a dog running", "two cats on a red sofa", "a", "the beach at night"],
                                    prompt="")["loss_lm"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_caption_greedy_ids_identical(seed):
    hf, ours = make(BlipForConditionalGeneration, seed=seed, eos_bias=6.0)
    x = images(seed)
    lengths = set()
    for max_length, min_length in [(12, 3), (20, 5), (8, 1)]:
        with torch.no_grad():
            want = hf.generate(x, num_beams=1, max_length=max_length, min_length=min_length).tolist()
        got = ours.generate(x, num_beams=1, max_length=max_length, min_length=min_length, prompt="",
                            return_ids=True)
        assert [upto_eos(s) for s in got] == [upto_eos(s) for s in want]
        lengths |= {len(upto_eos(s)) for s in got}
        assert all(len(set(s)) > 2 for s in got if len(upto_eos(s)) > 4), "degenerate captions"
    assert len(lengths) > 2


def test_caption_beam_search_ids_and_the_documented_differences():
    agree = disagree = 0
    kinds = set()
    for seed in range(4):
        for eos_bias in (5.0, 7.0):
            hf, ours = make(BlipForConditionalGeneration, seed=seed, eos_bias=eos_bias)
            x = images(seed)
            with torch.no_grad():
                image_embeds = ours.visual_encoder(x)
            for num_beams, max_length, min_length in [(3, 12, 3), (3, 20, 5), (4, 8, 1)]:
                with torch.no_grad():
                    theirs = hf.generate(x, num_beams=num_beams, max_length=max_length, min_length=min_length)
                mine = ours.generate(x, num_beams=num_beams, max_length=max_length, min_length=min_length,
                                     prompt="", return_ids=True)
                for i in range(len(x)):
                    def logprobs(seqs, i=i):
                        with torch.no_grad():
                            logits = ours.text_decoder(torch.tensor(seqs), None,
                                                       image_embeds[i:i + 1].expand(len(seqs), -1, -1))
                        return F.log_softmax(logits[:, -1].float(), -1)

                    ref5 = reference_beam_search(logprobs, num_beams, max_length, min_length, hf5_rules=True)
                    ref4 = reference_beam_search(logprobs, num_beams, max_length, min_length, hf5_rules=False)
                    case = (seed, eos_bias, num_beams, max_length, min_length, i)
                    assert upto_eos(theirs[i].tolist()) == ref5, case  # transformers 5 = the reference, 5's rules
                    assert mine[i] == ref4, case  # ours = the reference with 4.15's rules
                    if ref4 == ref5:
                        assert mine[i] == upto_eos(theirs[i].tolist()), case
                        agree += 1
                        kinds.add("sep" if mine[i][-1] == SEP_ID else "max_length")
                    else:
                        disagree += 1
    # the comparison is meaningful: most inputs agree, with captions ended by [SEP] and by max_length
    assert agree >= 3 * disagree and kinds == {"sep", "max_length"}, (agree, disagree, kinds)


# -------------------------------------------------------------------------------------------- ITM / ITC

def test_itm_probabilities_and_itc_similarities():
    hf, ours = make(BlipForImageTextRetrieval, seed=3, vision_width=48, text_width=32)
    load_into(ours, hf.state_dict(), strict=True)
    assert ours.task == "itm"
    x = images(3)
    ids, mask = tokenize(TEXTS, max_length=35)  # [CLS] first, as transformers' processor and blip_itm
    with torch.no_grad():
        logits = hf(input_ids=ids, pixel_values=x, attention_mask=mask, use_itm_head=True).itm_score
        sims = hf(input_ids=ids, pixel_values=x, attention_mask=mask, use_itm_head=False).itm_score
    prob = ours.itm_score(x, TEXTS)
    close(logits.softmax(-1)[:, 1], prob)
    assert prob.max() - prob.min() > 0.05  # not a constant
    close(sims, ours.itc_similarity(x, TEXTS))
    assert sims.shape == (4, 4)


# -------------------------------------------------------------------------------------------------- VQA

def test_vqa_generated_answers_identical():
    hf, ours = make(BlipForQuestionAnswering, seed=4, eos_bias=6.0, vision_width=32, text_width=32)
    load_into(ours, hf.state_dict(), strict=True)
    x = images(4, n=3)
    ids, mask = tokenize(QUESTIONS, max_length=35, first_token=ENC_ID)
    with torch.no_grad():
        theirs = hf.generate(input_ids=ids, pixel_values=x, attention_mask=mask, num_beams=3, max_length=10,
                             min_length=1)
    want = [decode(s) for s in theirs.tolist()]
    assert ours.answer(x, QUESTIONS, method="generate", num_beams=3, max_length=10, min_length=1) == want
    assert len(set(want)) > 1


# ------------------------------------------------------------------------------------------- round trip

@pytest.mark.parametrize("cls,task,widths", [
    (BlipForConditionalGeneration, "caption", dict(vision_width=48, text_width=32)),
    (BlipForImageTextRetrieval, "itm", dict(vision_width=48, text_width=32)),
    (BlipForQuestionAnswering, "vqa", dict(vision_width=32, text_width=32)),
])
def test_round_trip_through_transformers_layout(tmp_path, cls, task, widths):
    hf, _ = make(cls, seed=5, eos_bias=6.0, **widths)
    ours = blip.from_transformers(hf)
    out = tmp_path / "hf"
    blip.to_transformers(ours, out)

    back, info = cls.from_pretrained(out, output_loading_info=True, attn_implementation="eager")
    back.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    sd_hf, sd_back = hf.state_dict(), back.state_dict()
    assert sd_hf.keys() == sd_back.keys()
    for k in sd_hf:
        assert torch.equal(sd_hf[k], sd_back[k]), k

    x = images(5, n=3)
    with torch.no_grad():
        if task == "caption":
            assert torch.equal(back.generate(x, num_beams=3, max_length=10), hf.generate(x, num_beams=3, max_length=10))
        elif task == "itm":
            ids, mask = tokenize(TEXTS[:3])
            close(back(input_ids=ids, pixel_values=x, attention_mask=mask).itm_score,
                  hf(input_ids=ids, pixel_values=x, attention_mask=mask).itm_score, 0)
        else:
            ids, mask = tokenize(QUESTIONS, first_token=ENC_ID)
            assert torch.equal(back.generate(input_ids=ids, pixel_values=x, attention_mask=mask, max_length=6),
                               hf.generate(input_ids=ids, pixel_values=x, attention_mask=mask, max_length=6))

    again = blip.load_model(task, out)  # the directory (config.json + model.safetensors) is a checkpoint too
    a, b = ours.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_retrieval_model_exports_what_transformers_has(tmp_path):
    """A retrieval model's momentum encoders, queues and temperature have no place in transformers' BLIP."""
    torch.manual_seed(7)
    med = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               max_position_embeddings=64)
    ours = blip.load_model("retrieval", image_size=IMAGE, vision_width=48, vision_depth=2, vision_heads=2,
                           embed_dim=24, queue_size=8, med_config=med)
    blip.to_transformers(ours, tmp_path / "hf")
    back, info = BlipForImageTextRetrieval.from_pretrained(tmp_path / "hf", output_loading_info=True,
                                                           attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    x = images(7)
    ids, mask = tokenize(TEXTS, max_length=35, first_token=ENC_ID)  # the retrieval model's ITM reads [ENC] first
    with torch.no_grad():
        close(back.eval()(input_ids=ids, pixel_values=x, attention_mask=mask).itm_score.softmax(-1)[:, 1],
              ours.itm_score(x, TEXTS))
    itm = blip.load_model("itm", tmp_path / "hf")
    for k, v in itm.state_dict().items():
        assert torch.equal(v, ours.state_dict()[k]), k


def test_transformers_save_pretrained_directory_loads(tmp_path):
    """A directory written by transformers itself (its config.json omits default values) loads as it is."""
    hf, ours = make(BlipForConditionalGeneration, seed=6, eos_bias=6.0)
    hf.save_pretrained(tmp_path / "saved")
    loaded = blip.load_model("caption", tmp_path / "saved")
    x = images(6)
    assert loaded.generate(x, num_beams=3, max_length=12, min_length=3, return_ids=True, prompt="") == \
        ours.generate(x, num_beams=3, max_length=12, min_length=3, return_ids=True, prompt="")
    with torch.no_grad():
        close(loaded.visual_encoder(x), hf.vision_model(x).last_hidden_state)


# ------------------------------------------------------------------------------ configs beyond the defaults

def config_with(fields, vision_width=48, text_width=32):
    """tiny_config with `fields` ({'vision_config.x': v, 'text_config.y': w, 'z': u}) set."""
    base = tiny_config(vision_width, text_width).to_dict()
    top = {k: v for k, v in base.items() if k in ("image_text_hidden_size", "tie_word_embeddings")}
    sub = {"vision_config": dict(base["vision_config"]), "text_config": dict(base["text_config"])}
    for name, value in fields.items():
        part, _, field = name.rpartition(".")
        (sub[part] if part else top)[field] = value
    keep = ("_name_or_path", "architectures", "transformers_version", "model_type", "dtype")
    return BlipConfig(text_config={k: v for k, v in sub["text_config"].items() if k not in keep},
                      vision_config={k: v for k, v in sub["vision_config"].items() if k not in keep},
                      attn_implementation="eager", **top)


def outputs(model, task, image_size, hf):
    """The class's outputs on fixed inputs: caption = ViT tokens + decoder logits; itm = ITM probabilities + ITC
    similarities; vqa = question states + answer-decoder logits."""
    x = torch.randn(3, 3, image_size, image_size, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        if task == "caption":
            ids, mask = tokenize(TEXTS[:3], first_token=DEC_ID)
            if hf:
                v = model.vision_model(x).last_hidden_state
                return v, model.text_decoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=v).logits
            v = model.visual_encoder(x)
            return v, model.text_decoder(ids, mask, v)
        if task == "itm":
            ids, mask = tokenize(TEXTS[:3], max_length=35)
            if hf:
                return (model(input_ids=ids, pixel_values=x, attention_mask=mask).itm_score.softmax(-1)[:, 1],
                        model(input_ids=ids, pixel_values=x, attention_mask=mask, use_itm_head=False).itm_score)
            return model.itm_score(x, TEXTS[:3]), model.itc_similarity(x, TEXTS[:3])
        q, q_mask = tokenize(QUESTIONS, max_length=35, first_token=ENC_ID)
        a, a_mask = tokenize(["two", "a red dog", "yes"], first_token=DEC_ID)
        if hf:
            s = model.text_encoder(input_ids=q, attention_mask=q_mask,
                                   encoder_hidden_states=model.vision_model(x).last_hidden_state).last_hidden_state
            # no question mask: transformers 5.23's text decoder does not apply encoder_attention_mask (its logits
            # change with the padded question states); ours does. Unmasked, as in VQA generation, both agree.
            return s, model.text_decoder(input_ids=a, attention_mask=a_mask, encoder_hidden_states=s).logits
        s, _ = model.encode_questions(x, QUESTIONS)
        return s, model.text_decoder(a, a_mask, s)


FIELD_CASES = [  # (class, task, fields): each a non-default value of the fields it names
    (BlipForConditionalGeneration, "caption", {"vision_config.hidden_size": 40, "vision_config.intermediate_size": 160}),
    (BlipForConditionalGeneration, "caption", {"vision_config.intermediate_size": 100}),  # not 4 x width
    (BlipForConditionalGeneration, "caption", {"vision_config.num_hidden_layers": 3}),
    (BlipForConditionalGeneration, "caption", {"vision_config.num_attention_heads": 4}),
    (BlipForConditionalGeneration, "caption", {"vision_config.image_size": 48}),
    (BlipForConditionalGeneration, "caption", {"vision_config.patch_size": 8}),
    (BlipForConditionalGeneration, "caption", {"vision_config.layer_norm_eps": 0.5}),
    (BlipForConditionalGeneration, "caption", {"text_config.intermediate_size": 80}),
    (BlipForConditionalGeneration, "caption", {"text_config.layer_norm_eps": 0.5}),
    (BlipForConditionalGeneration, "caption", {"text_config.vocab_size": 30530}),
    (BlipForConditionalGeneration, "caption", {"text_config.max_position_embeddings": 48}),
    (BlipForConditionalGeneration, "caption", {"text_config.num_hidden_layers": 3}),
    (BlipForConditionalGeneration, "caption", {"text_config.hidden_dropout_prob": 0.2,  # training only: eval equal
                                               "text_config.attention_probs_dropout_prob": 0.3}),
    (BlipForImageTextRetrieval, "itm", {"image_text_hidden_size": 12}),
    (BlipForImageTextRetrieval, "itm", {"text_config.hidden_size": 40, "text_config.intermediate_size": 160}),
    (BlipForImageTextRetrieval, "itm", {"text_config.num_attention_heads": 4}),
    (BlipForImageTextRetrieval, "itm", {"vision_config.intermediate_size": 100, "vision_config.layer_norm_eps": 0.5}),
    (BlipForQuestionAnswering, "vqa", {"vision_config.hidden_size": 40, "vision_config.intermediate_size": 160,
                                       "text_config.hidden_size": 40}),
    (BlipForQuestionAnswering, "vqa", {"text_config.intermediate_size": 80, "vision_config.intermediate_size": 100}),
    (BlipForQuestionAnswering, "vqa", {"text_config.num_attention_heads": 4, "vision_config.num_hidden_layers": 3}),
]


@pytest.mark.parametrize("cls,task,fields", FIELD_CASES,
                         ids=[f"{t}-" + "+".join(f.replace("_config", "") for f in fs) for _, t, fs in FIELD_CASES])
def test_non_default_config_field_is_honoured_and_written_back(tmp_path, cls, task, fields):
    widths = dict(vision_width=32, text_width=32) if task == "vqa" else {}
    torch.manual_seed(0)
    hf = randomize(cls(config_with(fields, **widths)), seed=8)
    image_size = hf.config.vision_config.image_size
    want = outputs(hf, task, image_size, hf=True)
    hf.save_pretrained(tmp_path / "saved")
    for ours in (blip.from_transformers(hf), blip.load_model(task, tmp_path / "saved")):
        for a, b in zip(want, outputs(ours, task, image_size, hf=False)):
            close(a, b)
    blip.to_transformers(ours, tmp_path / "back")
    back = cls.from_pretrained(tmp_path / "back", attn_implementation="eager").eval()
    for name, value in fields.items():  # written back
        part, _, field = name.rpartition(".")
        assert getattr(getattr(back.config, part) if part else back.config, field) == value, name
    for a, b in zip(want, outputs(back, task, image_size, hf=True)):
        assert torch.equal(a, b)


REFUSED = [  # (fields, the name the error gives)
    ({"vision_config.hidden_act": "quick_gelu"}, "vision_config.hidden_act"),
    ({"text_config.hidden_act": "relu"}, "text_config.hidden_act"),
    ({"vision_config.attention_dropout": 0.1}, "vision_config.attention_dropout"),
    ({"text_config.is_decoder": False}, "text_config.is_decoder"),
    ({"text_config.pad_token_id": 1}, "text_config.pad_token_id"),
    ({"text_config.bos_token_id": 5}, "text_config.bos_token_id"),
    ({"text_config.sep_token_id": 7}, "text_config.sep_token_id"),
    ({"text_config.vocab_size": 30522}, "text_config.vocab_size"),
    ({"tie_word_embeddings": False, "text_config.tie_word_embeddings": False}, "tie_word_embeddings"),
]


@pytest.mark.parametrize("fields,name", REFUSED, ids=[n for _, n in REFUSED])
def test_config_field_blip_cannot_represent_is_refused_by_name(tmp_path, fields, name):
    hf = BlipForConditionalGeneration(config_with(fields))
    if name == "tie_word_embeddings":  # transformers really unties the LM head then
        dec = hf.text_decoder
        assert dec.cls.predictions.decoder.weight is not dec.bert.embeddings.word_embeddings.weight
    with pytest.raises(ValueError, match=re.escape(name)):
        blip.from_transformers(hf)
    hf.save_pretrained(tmp_path / "saved")
    with pytest.raises(ValueError, match=re.escape(name)):
        blip.load_model("caption", tmp_path / "saved")


def test_non_square_image_and_vqa_of_two_widths_are_refused(tmp_path):
    for field in ("image_size", "patch_size"):  # transformers cannot build these either; a config.json may say so
        cfg = config_with({}).to_dict()
        cfg["vision_config"][field] = [32, 48] if field == "image_size" else [16, 8]
        with pytest.raises(ValueError, match=f"vision_config.{field}"):
            blip.config_from_transformers(cfg)
    # transformers' VQA builds the answer decoder's cross-attention vision-wide and feeds it the question states
    hf = BlipForQuestionAnswering(config_with({}, vision_width=48, text_width=32))
    with pytest.raises(ValueError, match="vision_config.hidden_size"):
        blip.from_transformers(hf)
    hf.save_pretrained(tmp_path / "saved")
    with pytest.raises(ValueError, match="vision_config.hidden_size"):
        blip.load_model("vqa", tmp_path / "saved")
    ours = blip.load_model("vqa", image_size=IMAGE, vision_width=48, vision_depth=1, vision_heads=2,
                           med_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                           intermediate_size=64))
    with pytest.raises(ValueError, match="one width for both towers"):
        blip.to_transformers(ours, tmp_path / "out")
