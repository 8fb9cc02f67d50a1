"""The exits' training loss: cross-entropy, and self-distillation towards the last exit (joint) or a
given teacher (attach), checked against torch's own cross-entropy and KL divergence."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch
from torch.nn import functional

from offramp.build.train import TrainConfig, multi_exit_loss

ROWS, CLASSES = 12, 5


def exit_logits(exits: int = 3, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [(4.0 * torch.randn(ROWS, CLASSES, generator=generator)).requires_grad_() for _ in range(exits)]


def kl(teacher: torch.Tensor, student: torch.Tensor, temperature: float) -> torch.Tensor:
    """(B,) KL(softmax(teacher / T) || softmax(student / T)), by torch's kl_div."""
    target = functional.log_softmax(teacher / temperature, dim=1)
    return functional.kl_div(
        functional.log_softmax(student / temperature, dim=1), target, reduction="none", log_target=True
    ).sum(dim=1)


def test_distill_weight_zero_is_the_weighted_sum_of_cross_entropies() -> None:
    logits, labels, weights = exit_logits(), torch.arange(ROWS) % CLASSES, (0.3, 0.5, 1.0)
    plain = sum(w * functional.cross_entropy(z, labels) for w, z in zip(weights, logits, strict=True))
    torch.testing.assert_close(multi_exit_loss(logits, labels, weights), plain)
    torch.testing.assert_close(multi_exit_loss(logits, labels, weights, 0.0, temperature=3.0), plain)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_joint_distillation_mixes_labels_and_the_last_exit(temperature: float) -> None:
    logits, labels, weights, w = exit_logits(), torch.arange(ROWS) % CLASSES, (0.3, 0.5, 1.0), 0.6
    teacher = logits[-1].detach()
    want = weights[-1] * functional.cross_entropy(logits[-1], labels)  # the last exit: labels alone
    for weight, z in zip(weights[:-1], logits[:-1], strict=True):
        ce = functional.cross_entropy(z, labels, reduction="none")
        want = want + weight * ((1 - w) * ce + w * temperature**2 * kl(teacher, z, temperature)).mean()
    torch.testing.assert_close(multi_exit_loss(logits, labels, weights, w, temperature), want)


def test_the_last_exit_learns_from_the_labels_alone() -> None:
    """The teacher is detached: the distillation term moves the students, never the last exit."""
    logits, labels = exit_logits(), torch.arange(ROWS) % CLASSES
    multi_exit_loss(logits, labels, (1.0, 1.0, 1.0), 1.0).backward()
    last_grad = logits[-1].grad.clone()
    logits[-1].grad = None
    functional.cross_entropy(logits[-1], labels).backward()
    torch.testing.assert_close(last_grad, logits[-1].grad)
    assert logits[0].grad.abs().sum() > 0


def test_unlabelled_rows_take_the_distillation_term_only() -> None:
    """Rows without a label (-1) learn from the teacher alone, whatever ``distill_weight``; labelled
    rows mix. Attach mode: a given teacher, every exit its student."""
    logits = exit_logits(exits=2)
    labels = torch.arange(ROWS) % CLASSES
    labels[::3] = -1
    teacher, temperature, w = 3.0 * torch.randn(ROWS, CLASSES), 2.0, 0.25
    unlabelled = labels < 0
    want = 0.0
    for z in logits:
        ce = functional.cross_entropy(z, labels.clamp(min=0), reduction="none")
        distilled = temperature**2 * kl(teacher, z, temperature)
        want = want + torch.where(unlabelled, distilled, (1 - w) * ce + w * distilled).mean()
    got = multi_exit_loss(logits, labels, (1.0, 1.0), w, temperature, teacher=teacher)
    torch.testing.assert_close(got, want)
    # Distillation off: unlabelled rows still learn from the teacher (their only signal), labelled
    # rows from the labels alone.
    alone = multi_exit_loss(logits, labels, (1.0, 1.0), 0.0, temperature, teacher=teacher)
    want_alone = sum(
        torch.where(
            unlabelled,
            temperature**2 * kl(teacher, z, temperature),
            functional.cross_entropy(z, labels.clamp(min=0), reduction="none"),
        ).mean()
        for z in logits
    )
    torch.testing.assert_close(alone, want_alone)


def test_a_build_without_distillation_keeps_its_recorded_settings() -> None:
    """Build keys hold ``TrainConfig.record()``: with distillation off they are what they were before it
    existed (so cached builds stay valid); with it on, they change."""
    plain = TrainConfig(epochs=2)
    before = {k: v for k, v in asdict(plain).items() if not k.startswith("distill_")}
    assert plain.record() == before
    assert TrainConfig(epochs=2, distill_weight=0.5).record() == {**before, "distill_weight": 0.5}
