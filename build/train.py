"""Joint training of a backbone and its exit heads, and per-exit evaluation."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

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
    max_train_rows: int | None = None  # a subset, for quick builds in tests


def seed_everything(seed: int) -> None:
    """Same seed, same weights: the build's cache and the tests rely on it."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.use_deterministic_algorithms(True)


def multi_exit_loss(
    exit_logits: Sequence[torch.Tensor], labels: torch.Tensor, weights: Sequence[float]
) -> torch.Tensor:
    """Weighted sum of the exits' cross-entropies (each logits (B, C), labels (B,))."""
    return sum(w * nn.functional.cross_entropy(logits, labels) for w, logits in zip(weights, exit_logits))


def train_exits(
    model: nn.Module,
    inputs: Sequence[np.ndarray],
    labels: np.ndarray,
    config: TrainConfig,
    *,
    on_step: Callable[[float], None] | None = None,
    progress: bool = True,
) -> list[float]:
    """Trains ``model`` (raw inputs -> list of exit logits) on rows of ``inputs``; returns epoch losses.

    One-cycle AdamW; rows are shuffled by a generator seeded from ``config.seed``.
    """
    seed_everything(config.seed)
    rows = len(labels) if config.max_train_rows is None else min(len(labels), config.max_train_rows)
    tensors = [torch.from_numpy(np.ascontiguousarray(x[:rows])) for x in inputs]
    targets = torch.from_numpy(labels[:rows])
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
            loss = multi_exit_loss(exit_logits, targets[index], weights)
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
