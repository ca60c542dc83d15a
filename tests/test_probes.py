"""The linear probe (blip.evaluation.probes): it reads a label that the features carry, and finds nothing where
they carry none."""
import pytest
import torch

from blip.evaluation.probes import fine_tuned_classifier, linear_probe


def _clusters(n, d, classes, generator, spread=0.3):
    centres = torch.randn(classes, d, generator=generator) * 3
    y = torch.arange(n) % classes
    return centres[y] + spread * torch.randn(n, d, generator=generator), y


def test_a_label_the_features_carry_is_read_and_one_they_do_not_is_at_chance():
    g = torch.Generator().manual_seed(0)
    x, y = _clusters(400, 16, 4, g)
    r = linear_probe(x[:300], y[:300], x[300:], y[300:])
    assert r["acc"] == 100.0 and r["classes"] == 4 and r["majority"] == pytest.approx(25.0)
    noise = torch.randn(400, 16, generator=g)  # labels independent of the features
    labels = torch.randint(0, 2, (400,), generator=g)
    r = linear_probe(noise[:300], labels[:300], noise[300:], labels[300:])
    assert abs(r["acc"] - 50.0) < 15.0
    # a feature that is a constant offset and scale of the label: standardisation makes it readable
    z = torch.randn(400, 1, generator=g) * 0.01 + 1000 + labels[:, None].float() * 0.5
    assert linear_probe(z[:300], labels[:300], z[300:], labels[300:])["acc"] == 100.0


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="train 3 vs 2"):
        linear_probe(torch.zeros(3, 2), torch.zeros(2), torch.zeros(1, 2), torch.zeros(1))


def test_a_fine_tuned_head_reads_what_its_frozen_encoder_hid_and_leaves_the_encoder_as_it_was():
    """The label is the sign of x[1]; the encoder starts reading x[0] only: frozen, its feature carries nothing (the
    linear probe is at chance); fine-tuned with the head, it learns to read x[1]."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 2, generator=g)
    y = (x[:, 1] > 0).long()
    encoder = torch.nn.Linear(2, 4)
    with torch.no_grad():
        encoder.weight.copy_(torch.tensor([[1.0, 0.0]] * 4))
        encoder.bias.zero_()
    before = [p.detach().clone() for p in encoder.parameters()]
    rows = list(x)

    def encode(batch):
        return torch.tanh(encoder(torch.stack(batch)))

    with torch.no_grad():
        frozen = linear_probe(encode(rows[:300]), y[:300], encode(rows[300:]), y[300:])
    assert abs(frozen["acc"] - 50.0) < 15.0
    tuned = fine_tuned_classifier(encode, encoder.parameters(), rows[:300], y[:300], rows[300:], y[300:], epochs=20,
                                  lr=3e-2, head_lr=3e-2, seed=1)
    assert tuned["acc"] > 90.0 and tuned["classes"] == 2
    assert all(torch.equal(a, b) for a, b in zip(before, encoder.parameters()))  # restored
    again = fine_tuned_classifier(encode, encoder.parameters(), rows[:300], y[:300], rows[300:], y[300:], epochs=20,
                                  lr=3e-2, head_lr=3e-2, seed=1)
    assert again == tuned  # the batches' order and the head's start come from `seed`
