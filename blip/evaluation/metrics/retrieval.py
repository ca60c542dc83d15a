"""Image-text retrieval recall, as the original BLIP `itm_eval`."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def _as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor (bf16 included) without importing torch here
        x = x.detach().float().cpu().numpy()
    return np.asarray(x)


def retrieval_recall(score_i2t, score_t2i, txt2img: Mapping | Sequence,
                     img2txt: Mapping | Sequence) -> dict[str, float]:
    """Recall@1/5/10 in percent for both directions.

    score_i2t: [n_img, n_txt], score_t2i: [n_txt, n_img] (arrays or tensors); txt2img[t] is the
    image of caption t, img2txt[i] the captions of image i (dicts keyed by int, or lists). An image
    counts as found at the best (lowest) rank of any of its captions. Ranking is
    `np.argsort(score)[::-1]` as in the original, so ties resolve the same way.
    """
    score_i2t, score_t2i = _as_numpy(score_i2t), _as_numpy(score_t2i)

    ranks = np.zeros(score_i2t.shape[0])
    for i, row in enumerate(score_i2t):
        order = np.argsort(row)[::-1]
        ranks[i] = min(np.where(order == t)[0][0] for t in img2txt[i])
    tr1, tr5, tr10 = (100.0 * np.mean(ranks < k) for k in (1, 5, 10))

    ranks = np.zeros(score_t2i.shape[0])
    for t, row in enumerate(score_t2i):
        order = np.argsort(row)[::-1]
        ranks[t] = np.where(order == txt2img[t])[0][0]
    ir1, ir5, ir10 = (100.0 * np.mean(ranks < k) for k in (1, 5, 10))

    tr_mean, ir_mean = (tr1 + tr5 + tr10) / 3, (ir1 + ir5 + ir10) / 3
    out = dict(txt_r1=tr1, txt_r5=tr5, txt_r10=tr10, txt_r_mean=tr_mean,
               img_r1=ir1, img_r5=ir5, img_r10=ir10, img_r_mean=ir_mean,
               r_mean=(tr_mean + ir_mean) / 2)
    return {k: float(v) for k, v in out.items()}
