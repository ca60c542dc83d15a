"""Static-shape decoding (blip.models.generation.StaticRows: the rows of a fixed layout over a preallocated cache, the step a
CUDA graph on a GPU) gives today's tokens: run eagerly on the CPU, beam search, greedy and nucleus sampling
(several captions per image) produce exactly DynamicRows' ids, for the caption and the VQA decoders."""
import pytest
import torch

import blip
from blip.models.generation import Decoding, DynamicRows, StaticRows, generate_ids
from blip.data.tokenizer import SEP_ID


@pytest.fixture(scope="module")
def captioner():
    """The tiny preset with perturbed weights and [SEP] made likelier: captions that differ between images and end at
    different lengths (beam search: 8 to 12 tokens of 20), so inputs finish at different steps."""
    torch.manual_seed(0)
    model = blip.load_model("caption", preset="tiny")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        model.text_decoder.cls.predictions.bias[SEP_ID] += 3
    return model.eval()


def images(n, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def both(model, x, **kw):
    out = {}
    for static in (False, True):
        generator = torch.Generator().manual_seed(7) if kw.get("sample") else None
        out[static] = model.generate(x, return_ids=True, generator=generator, static=static, **kw)
    return out


@pytest.mark.parametrize("kw", [dict(num_beams=3, max_length=20, min_length=5),
                                dict(num_beams=3, max_length=12, min_length=2, repetition_penalty=1.3),
                                dict(num_beams=5, max_length=9, min_length=1),
                                dict(num_beams=1, max_length=15, min_length=3),
                                dict(sample=True, top_p=0.9, max_length=15, min_length=3, repetition_penalty=1.1),
                                dict(sample=True, num_captions=3, max_length=12, min_length=2)])
def test_static_rows_give_the_dynamic_tokens(captioner, kw):
    out = both(captioner, images(12), **kw)
    assert out[True] == out[False]
    assert len({tuple(ids) for ids in out[False]}) > 1  # the images were told apart
    if kw.get("num_beams", 1) > 1 and kw["max_length"] == 20:
        assert len({len(ids) for ids in out[False]}) > 1  # inputs ending at different steps


def test_beam_search_with_finished_inputs_staying_in_place(captioner, monkeypatch):
    """The static layout keeps a finished input's rows (ignored) where the dynamic one drops them: check that both
    happened in this run, and that the tokens agree."""
    kept, dropped = [], []
    monkeypatch.setattr(DynamicRows, "keep", lambda self, slots, f=DynamicRows.keep: (dropped.append(len(slots)),
                                                                                     f(self, slots))[1])
    step = StaticRows.step
    monkeypatch.setattr(StaticRows, "step", lambda self, tokens, src=None: (kept.append(len(tokens)),
                                                                            step(self, tokens, src))[1])
    out = both(captioner, images(10, seed=3), num_beams=3, max_length=20, min_length=2)
    assert out[True] == out[False]
    assert dropped and min(dropped) < 10  # some inputs left the dynamic batch early
    assert set(kept) == {30}  # every static step kept all 10 inputs x 3 beams


def test_vqa_generation_and_the_graph_free_fallback(captioner):
    torch.manual_seed(0)
    vqa = blip.load_model("vqa", preset="micro").eval()
    x, qs = images(6), ["what is it", "how many", "is it red", "what color", "where", "why"]
    answers = [vqa.answer(x, qs, method="generate", static=static) for static in (False, True)]
    assert answers[0] == answers[1]
    # an encoder padding mask keeps the dynamic rows (the static step attends to every encoder position)
    states = torch.randn(2, 5, 16)
    prompt = torch.full((2, 1), 30522)
    how = Decoding(num_beams=2, max_length=6, min_length=1, static=True)
    masked = generate_ids(vqa.text_decoder, states, prompt, how, encoder_mask=torch.ones(2, 5, dtype=torch.long))
    assert len(masked) == 2


def test_one_decoding_value_or_its_fields_as_keywords_and_unknown_ones_refused():
    torch.manual_seed(0)
    model = blip.load_model("caption", preset="micro")
    x = torch.randn(2, 3, model.cfg.image_size, model.cfg.image_size)
    how = Decoding(num_beams=2, max_length=9, min_length=3)
    assert model.generate(x, how) == model.generate(x, num_beams=2, max_length=9, min_length=3)
    assert model.generate(x, how, num_beams=1) == model.generate(x, num_beams=1, max_length=9, min_length=3)
    with pytest.raises(TypeError, match=r"unknown decoding option\(s\) \['beams'\]"):
        model.generate(x, beams=2)
