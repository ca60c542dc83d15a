"""Linear probes: how much of a label frozen features carry (the unimodal evaluations of X-FM and of any encoder);
and a classification head fine-tuned with its encoder.

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


def fine_tuned_classifier(encode, params, train_inputs, train_y, test_inputs, test_y, *, epochs: int = 5,
                          lr: float = 1e-4, head_lr: float = 1e-3, batch_size: int = 16, seed: int = 0) -> dict:
    """A classification head fine-tuned with the encoder under it (the unimodal fine-tuning of X-FM's text tasks):
    `encode(inputs)` -> [B, d] features of a list of inputs (gradients flowing into `params`, the encoder's
    parameters, trained at `lr`); a fresh linear head at `head_lr`; AdamW, cross-entropy, shuffled batches drawn
    from `seed`. The encoder's parameters are restored afterwards: the caller's model is left as it was.
    -> {"acc": held-out accuracy %, "train_acc": the last epoch's %, "classes": n}."""
    params = list(params)
    saved = [p.detach().clone() for p in params]
    train_y, test_y = torch.as_tensor(train_y).long(), torch.as_tensor(test_y).long()
    n_classes = int(max(train_y.max(), test_y.max())) + 1
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        width = encode(train_inputs[:1]).shape[-1]
    head = torch.nn.Linear(width, n_classes)
    torch.nn.init.normal_(head.weight, std=0.02, generator=generator)
    torch.nn.init.zeros_(head.bias)
    head = head.to(saved[0].device if saved else "cpu")
    opt = torch.optim.AdamW([{"params": params, "lr": lr}, {"params": head.parameters(), "lr": head_lr}],
                            weight_decay=0.01)
    correct = 0
    try:
        for _ in range(epochs):
            correct = 0
            for rows in torch.randperm(len(train_y), generator=generator, device="cpu").split(batch_size):
                logits = head(encode([train_inputs[i] for i in rows.tolist()]).float())
                labels = train_y[rows].to(logits.device)
                loss = F.cross_entropy(logits, labels)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                correct += int((logits.argmax(1) == labels).sum())
        with torch.no_grad():
            pred = torch.cat([head(encode(test_inputs[k:k + 64]).float()).argmax(1).cpu()
                              for k in range(0, len(test_y), 64)])
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
    return {"acc": 100.0 * float((pred == test_y).float().mean()), "train_acc": 100.0 * correct / len(train_y),
            "classes": n_classes}
