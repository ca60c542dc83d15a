"""Linear probes: how much of a label frozen features carry (the unimodal evaluations of X-FM and of any encoder).

A multinomial logistic regression on standardised features, fitted full-batch with L-BFGS (deterministic: no
sampling, no learning-rate schedule to tune), scored on held-out features. The majority class of the training
labels is reported beside it: a probe is worth what it adds over that.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_probe(train_x, train_y, test_x, test_y, *, weight_decay: float = 1e-3, steps: int = 200) -> dict:
    """{"acc": test accuracy %, "majority": the most frequent training label's test accuracy %, "classes": n}.
    x: [n, d] features; y: [n] integer labels (classes absent from training are never predicted)."""
    train_x, test_x = train_x.detach().float().cpu(), test_x.detach().float().cpu()
    train_y, test_y = torch.as_tensor(train_y).long().cpu(), torch.as_tensor(test_y).long().cpu()
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise ValueError(f"features and labels differ in length: train {len(train_x)} vs {len(train_y)}, "
                         f"test {len(test_x)} vs {len(test_y)}")
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    a, b = (train_x - mean) / std, (test_x - mean) / std
    n_classes = int(max(train_y.max(), test_y.max())) + 1
    weight = torch.zeros(a.shape[1], n_classes, device=a.device, requires_grad=True)
    bias = torch.zeros(n_classes, device=a.device, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(a @ weight + bias, train_y) + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = (b @ weight + bias).argmax(1)
    majority = int(torch.bincount(train_y, minlength=n_classes).argmax())
    return {"acc": 100.0 * float((pred == test_y).float().mean()),
            "majority": 100.0 * float((test_y == majority).float().mean()), "classes": n_classes}
