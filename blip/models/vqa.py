"""VQA (`vqa`): the question cross-attends to the image; the answer decoder cross-attends to the question."""
from __future__ import annotations

import torch

from ..data.batches import VQABatch
from .generation import Decoding, decoding_of, generate_ids
from .med import TextDecoder, TextModel
from ..data.tokenizer import DEC_ID, ENC_ID, PAD_ID, decode
from .base import BlipModel


class BlipVQA(BlipModel):
    task = "vqa"
    vision_drop_path = 0.1
    text_context_cross_attention = ("text_decoder.bert.",)  # the answer decoder reads the question
    transformers_class = "BlipForQuestionAnswering"
    question_max_length = 35
    answer_max_length = None  # answers are not truncated (the original); a static-shape (compiled) run pads them to
    answer_static_length = 10  # this many tokens ([DEC] and [SEP] included), VQA v2's answers fit
    decoding = Decoding(num_beams=3, max_length=10, min_length=1)  # the original's answer generation

    def __init__(self, cfg):
        super().__init__(cfg)
        self.text_encoder = TextModel(self.text_cfg())
        # The answer decoder reads question states: its cross-attention is text-wide, even beside ViT-L.
        tcfg = self.cfg.text()
        self.text_decoder = TextDecoder(self.cfg.text(encoder_width=tcfg.hidden_size))

    def encode_questions(self, pixel_values, questions):
        ids, mask = self.tokenize(questions, max_length=self.question_max_length, first_token=ENC_ID)
        return self.text_encoder(ids, mask, self.visual_encoder(pixel_values)), mask

    def losses(self, pixel_values, questions, answers, n, weights):
        """Σ weight · (summed, label-smoothed) answer loss / batch size; `n[b]` answers belong to question b."""
        batch = VQABatch.of(pixel_values, questions, answers, n, weights,
                            question_max_length=self.question_max_length, answer_max_length=self.answer_max_length)
        return self.batch_losses(batch.to(self.device))

    def batch_losses(self, batch: VQABatch):
        states = self.text_encoder(batch.q_ids, batch.q_mask, self.visual_encoder(batch.images))
        states, q_mask = states[batch.a_question], batch.q_mask[batch.a_question]  # each answer reads its question
        seq_loss = self.text_decoder.loss(batch.a_ids, batch.a_labels, batch.a_mask, states, q_mask,
                                          reduction="none", positions=batch.lm_positions)
        return {"loss_vqa": (batch.weights.to(seq_loss.dtype) * seq_loss).sum() / batch.images.shape[0]}

    @torch.no_grad()
    def answer(self, pixel_values, questions, how: Decoding | None = None, *, method="generate", answer_list=None,
               k=128, **options):
        """Answers by beam-search generation (`how`: one Decoding value, default `self.decoding`, or its fields as
        keywords over it), or by ranking `answer_list` (top-k first tokens, then full sequences scored by −loss),
        both as the original."""
        states, q_mask = self.encode_questions(pixel_values, questions)
        if method == "generate":
            # The original attends to every question position here, padding included.
            prompt = torch.full((len(questions), 1), DEC_ID, dtype=torch.long, device=self.device)
            how = decoding_of(self.decoding, how, **options)
            ids = generate_ids(self.text_decoder, states, prompt, how)
            return [decode(seq) for seq in ids]
        if method != "rank":
            raise ValueError(f"method must be 'generate' or 'rank', got {method!r}")
        if not answer_list:
            raise ValueError("method='rank' needs answer_list")
        best = self.rank_answers(states, q_mask, answer_list, k)
        return [answer_list[i] for i in best.tolist()]

    def rank_answers(self, states, q_mask, answer_list, k):
        ans_ids, ans_mask = self.tokenize(answer_list, first_token=DEC_ID)
        nq, k = states.shape[0], min(k, len(answer_list))
        start = torch.full((nq, 1), DEC_ID, dtype=torch.long, device=self.device)
        first_logits = self.text_decoder(start, None, states, q_mask)[:, 0].float()
        first_probs = first_logits.softmax(-1).index_select(1, ans_ids[:, 1])
        _, top = first_probs.topk(k, dim=1)  # [nq, k]
        ids, mask = ans_ids[top.view(-1)], ans_mask[top.view(-1)]
        targets = ids.masked_fill(ids == PAD_ID, -100)
        seq_loss = self.text_decoder.loss(ids, targets, mask, states.repeat_interleave(k, 0),
                                          q_mask.repeat_interleave(k, 0), reduction="none")
        log_probs = -seq_loss.view(nq, k)
        return top.gather(1, log_probs.argmax(1, keepdim=True))[:, 0]
