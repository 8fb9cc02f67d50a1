"""What every multi-exit model hands the rest of the build: its segments, its full network, its inputs.

A segment maps the previous hidden state (or the raw inputs, for the first) to ``(hidden, logits)``;
its exit head is part of it. The full network is the same computation without any exit but the last,
which is the baseline served as ``<name>_full`` and the fallback for forced full-depth requests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from offramp.backend.contract import BATCH_AXIS, HIDDEN_IN, TensorSpec


@dataclass
class SegmentedNetwork:
    """A multi-exit model cut at its exits."""

    segments: list[nn.Module]  # segment k: (hidden_{k-1}, *side) -> (hidden_k, logits_k)
    full: nn.Module  # raw inputs -> logits of the last exit, no early heads
    inputs: list[TensorSpec]  # the raw inputs of segment 0 and of the full network
    side_inputs: list[str] = field(default_factory=list)  # raw inputs every later segment needs too
    # Variable axes of the hidden state between segments: (B, T, H) for a transformer, (B, C, H, W) here.
    hidden_axes: dict[int, str] = field(default_factory=lambda: {0: BATCH_AXIS})

    def segment_input_names(self, index: int) -> list[str]:
        if index == 0:
            return [spec.name for spec in self.inputs]
        return [HIDDEN_IN, *self.side_inputs]

    def example_inputs(self, batch: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
        """Random raw inputs for tracing and tests (variable axes get length 8)."""
        generator = torch.Generator().manual_seed(seed)
        tensors = []
        for spec in self.inputs:
            shape = (batch, *(8 if d < 0 else d for d in spec.shape))
            if spec.dtype.startswith("float"):
                tensors.append(torch.rand(shape, generator=generator))
            else:
                tensors.append(torch.ones(shape, dtype=getattr(torch, spec.dtype)))
        return tuple(tensors)

    @torch.no_grad()
    def exit_logits(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every exit, running the segments in a chain (each (B, C))."""
        side = {spec.name: t for spec, t in zip(self.inputs, inputs, strict=True)}
        hidden, logits = self.segments[0](*inputs)
        outputs = [logits]
        for segment in self.segments[1:]:
            hidden, logits = segment(hidden, *(side[name] for name in self.side_inputs))
            outputs.append(logits)
        return outputs


def count_macs(module: nn.Module, *inputs: torch.Tensor) -> int:
    """Multiply-accumulates per row of the convolutions and linear layers of one forward pass.

    Counted from layer shapes, not timed, so the figure is exact and repeatable; it ignores
    element-wise work (activations, norms, pooling), which is small next to the matmuls.
    """
    total = 0

    def on_conv(layer: nn.Conv2d, _inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        kernel = layer.weight.shape[1] * layer.weight.shape[2] * layer.weight.shape[3]
        total += output[0].numel() * kernel

    def on_linear(layer: nn.Linear, _inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        total += output[0].numel() * layer.in_features

    hooks = []
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            hooks.append(layer.register_forward_hook(on_conv))
        elif isinstance(layer, nn.Linear):
            hooks.append(layer.register_forward_hook(on_linear))
    try:
        with torch.no_grad():
            module(*(t[:1] for t in inputs))
    finally:
        for hook in hooks:
            hook.remove()
    return total
