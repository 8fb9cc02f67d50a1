"""Joint training of a backbone and its exit heads, and per-exit evaluation.

The exits' loss (``multi_exit_loss``): each exit's cross-entropy on the labels, and, for the early exits,
self-distillation towards a teacher's output distribution (Hinton et al. 2015, "Distilling the Knowledge
in a Neural Network"): ``(1 - w) CE(label) + w T^2 KL(softmax(teacher / T) || softmax(exit / T))``. In
joint training the teacher is the model's own last exit, detached (it learns from the labels alone);
in attach mode it is the frozen network's head, given as logits per row. What early exit is calibrated
on, agreement with the last exit, is what the distilled term trains for.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 3
    batch_size: int = 128
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0
    # Weights of the exits' losses, or None for equal weights.
    exit_weights: tuple[float, ...] | None = None
    # Share w of the distillation term in each early exit's loss (0: labels alone; 1: the teacher alone,
    # labels unused) and its temperature T (see the module docstring).
    distill_weight: float = 0.0
    distill_temperature: float = 1.0
    max_train_rows: int | None = None  # a subset, for quick builds in tests

    def record(self) -> dict[str, object]:
        """The settings as build keys and manifests hold them (``recorded_settings``)."""
        return recorded_settings(asdict(self))


# Settings that change nothing at these values: build keys leave them out there (``recorded_settings``).
DISTILLATION_DEFAULTS = {"distill_weight": 0.0, "distill_temperature": 1.0}


def recorded_settings(settings: dict[str, object]) -> dict[str, object]:
    """``settings`` as build keys hold them: a distillation field only where it differs from its default,
    so a build made before distillation existed keeps its key (and its cache: the vision recipe trains
    for an hour, the text ones for many minutes) while distillation is off."""
    return {
        k: v for k, v in settings.items() if k not in DISTILLATION_DEFAULTS or v != DISTILLATION_DEFAULTS[k]
    }


def seed_everything(seed: int) -> None:
    """Same seed, same weights: the build's cache and the tests rely on it."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.use_deterministic_algorithms(True)


def multi_exit_loss(
    exit_logits: Sequence[torch.Tensor],
    labels: torch.Tensor,
    weights: Sequence[float],
    distill_weight: float = 0.0,
    temperature: float = 1.0,
    teacher: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted sum of the exits' losses; each logits (B, C), labels (B,) with -1 for an unlabelled row.

    Without ``teacher`` (joint) the last exit is the teacher of the others and learns from the labels
    alone; with ``teacher`` (B, C) logits (attach) every exit is its student. A student's row loss is
    ``(1 - w) CE + w T^2 KL`` where the row has a label and the distillation term alone where it has
    none; rows are averaged.
    """
    students = len(exit_logits) if teacher is not None else len(exit_logits) - 1
    teacher = exit_logits[-1] if teacher is None else teacher
    labelled = labels >= 0  # (B,)
    row_weight = torch.where(labelled, distill_weight, 1.0)  # (B,) of the distillation term
    total = torch.zeros(())
    for index, (w, logits) in enumerate(zip(weights, exit_logits, strict=True)):
        ce = nn.functional.cross_entropy(logits, labels.clamp(min=0), reduction="none")  # (B,)
        ce = torch.where(labelled, ce, 0.0)
        if index >= students or (distill_weight == 0.0 and bool(labelled.all())):
            total = total + w * ce.mean()
            continue
        kl = distillation_kl(logits, teacher, temperature)  # (B,)
        total = total + w * ((1.0 - row_weight) * ce + row_weight * temperature**2 * kl).mean()
    return total


def distillation_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """(B, C) student and teacher logits -> (B,) KL(softmax(teacher / T) || softmax(student / T)); the
    teacher is detached (it does not learn from its students)."""
    target = torch.softmax(teacher.detach() / temperature, dim=-1)
    log_student = torch.log_softmax(student / temperature, dim=-1)
    return (target * (torch.log(target.clamp(min=1e-12)) - log_student)).sum(dim=-1)


def train_exits(
    model: nn.Module,
    inputs: Sequence[np.ndarray],
    labels: np.ndarray,
    config: TrainConfig,
    *,
    teacher: np.ndarray | None = None,
    on_step: Callable[[float], None] | None = None,
    progress: bool = True,
) -> list[float]:
    """Trains ``model`` (raw inputs -> list of exit logits) on rows of ``inputs``; returns epoch losses.

    ``labels`` (N,) int, -1 for an unlabelled row; ``teacher`` (N, C) the logits every exit distils
    towards (attach mode; see ``multi_exit_loss``). One-cycle AdamW; rows are shuffled by a generator
    seeded from ``config.seed``.
    """
    seed_everything(config.seed)
    rows = len(labels) if config.max_train_rows is None else min(len(labels), config.max_train_rows)
    tensors = [torch.from_numpy(np.ascontiguousarray(x[:rows])) for x in inputs]
    targets = torch.from_numpy(np.asarray(labels[:rows], dtype=np.int64))
    teachers = None if teacher is None else torch.from_numpy(np.asarray(teacher[:rows], dtype=np.float32))
    steps_per_epoch = (rows + config.batch_size - 1) // config.batch_size
    optimizer = torch.optim.AdamW(model.parameters(), config.learning_rate, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, config.learning_rate, total_steps=config.epochs * steps_per_epoch
    )
    generator = torch.Generator().manual_seed(config.seed)
    epoch_losses = []
    model.train()
    for epoch in range(config.epochs):
        order = torch.randperm(rows, generator=generator)
        total = 0.0
        bar = tqdm(
            range(steps_per_epoch), desc=f"train epoch {epoch + 1}/{config.epochs}", disable=not progress
        )
        for step in bar:
            index = order[step * config.batch_size : (step + 1) * config.batch_size]
            exit_logits = model(*(t[index] for t in tensors))
            weights = config.exit_weights or (1.0,) * len(exit_logits)
            loss = multi_exit_loss(
                exit_logits, targets[index], weights, config.distill_weight, config.distill_temperature,
                None if teachers is None else teachers[index],
            )  # fmt: skip
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item()
            bar.set_postfix(loss=f"{total / (step + 1):.3f}")
            if on_step is not None:
                on_step(loss.item())
        epoch_losses.append(total / steps_per_epoch)
    model.eval()
    return epoch_losses


@torch.no_grad()
def predict_exits(
    exit_logits_of: Callable[..., list[torch.Tensor]], inputs: Sequence[np.ndarray], batch_size: int = 512
) -> np.ndarray:
    """Logits of every exit for every row: (exits, N, C)."""
    chunks = []
    for start in range(0, len(inputs[0]), batch_size):
        batch = [torch.from_numpy(np.ascontiguousarray(x[start : start + batch_size])) for x in inputs]
        chunks.append(torch.stack(exit_logits_of(*batch)).numpy())
    return np.concatenate(chunks, axis=1)


def exit_accuracies(all_exit_logits: np.ndarray, labels: np.ndarray) -> list[float]:
    """Accuracy of each exit's argmax, from logits (exits, N, C)."""
    return [float((logits.argmax(axis=1) == labels).mean()) for logits in all_exit_logits]


def exit_agreements(all_exit_logits: np.ndarray) -> list[float]:
    """Share of rows on which each exit's argmax is the last exit's (the final head's), from (exits, N, C)."""
    final = all_exit_logits[-1].argmax(axis=1)
    return [float((logits.argmax(axis=1) == final).mean()) for logits in all_exit_logits]
