"""A residual CNN with an exit head after every stage (BranchyNet-style), for images such as Fashion-MNIST.

The stem downsamples at once (stride 2): at full 28x28 resolution the stem and first stage cost half
the network (exit costs 0.51, 0.81, 1.00 in a reference run), which leaves early exits little to
save.

The early exits' heads pool the stage's output to a 4x4 grid before an MLP (``PooledExitHead``); the
last exit is the network's own head, a global average and a linear layer. A global average at the first
stage, where a garment's parts are still apart, left exit 0 at 84% test accuracy against 91% at the
last; the pooled head reached 90-91% for 3-4% more compute (Fashion-MNIST, 3 epochs; the measurements
behind the defaults are in ``build/recipes.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from offramp.build.segmented import SegmentedNetwork, TensorSpec


@dataclass(frozen=True)
class CNNConfig:
    in_channels: int = 1
    image_size: int = 28
    num_classes: int = 10
    stage_channels: tuple[int, ...] = (32, 64, 128)
    blocks_per_stage: int = 2
    # Pixel statistics, applied inside the network so clients send raw [0, 1] pixels.
    pixel_mean: float = 0.286
    pixel_std: float = 0.353


class ResidualBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ExitHead(nn.Module):
    """Global average pool and a linear classifier: (B, C, H, W) -> (B, classes)."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.mean(dim=(2, 3)))


EXIT_GRID = 4  # a pooled exit head pools the stage's output to at most EXIT_GRID x EXIT_GRID positions
EXIT_HIDDEN = 256  # width of the pooled exit head's hidden layer


class PooledExitHead(nn.Module):
    """(B, C, H, W) -> (B, classes): average pool to at most EXIT_GRID^2 positions, then an MLP. Where
    an image's parts are still apart (early stages), a global average leaves little to classify by."""

    def __init__(self, channels: int, height: int, width: int, num_classes: int) -> None:
        super().__init__()
        grid = (min(EXIT_GRID, height), min(EXIT_GRID, width))
        self.pool = nn.AdaptiveAvgPool2d(grid)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * grid[0] * grid[1], EXIT_HIDDEN),
            nn.ReLU(),
            nn.Linear(EXIT_HIDDEN, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(x))


class CNNSegment(nn.Module):
    """One stage and its exit head: (B, C_in, H, W) -> (hidden (B, C, H', W'), logits (B, classes))."""

    def __init__(self, body: nn.Module, head: ExitHead) -> None:
        super().__init__()
        self.body = body
        self.head = head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.body(x)
        return hidden, self.head(hidden)


class FullCNN(nn.Module):
    """The stages end to end with only the last head: the baseline without early exits."""

    def __init__(self, bodies: list[nn.Module], head: ExitHead) -> None:
        super().__init__()
        self.bodies = nn.Sequential(*bodies)
        self.head = head

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.bodies(image))


class Normalize(nn.Module):
    def __init__(self, mean: float, std: float) -> None:
        super().__init__()
        self.mean = mean
        self.std = std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class MultiExitCNN(nn.Module):
    def __init__(self, config: CNNConfig = CNNConfig()) -> None:
        super().__init__()
        self.config = config
        first = config.stage_channels[0]
        stem = nn.Sequential(
            Normalize(config.pixel_mean, config.pixel_std),
            nn.Conv2d(config.in_channels, first, 3, 2, 1, bias=False),
            nn.BatchNorm2d(first),
            nn.ReLU(),
        )
        stages = []
        in_channels = first
        for index, channels in enumerate(config.stage_channels):
            blocks = [
                ResidualBlock(
                    in_channels if b == 0 else channels, channels, 2 if (index > 0 and b == 0) else 1
                )
                for b in range(config.blocks_per_stage)
            ]
            stages.append(nn.Sequential(stem, *blocks) if index == 0 else nn.Sequential(*blocks))
            in_channels = channels
        self.stages = nn.ModuleList(stages)
        sizes = [(config.image_size - 1) // 2 + 1]  # each stage's output side: the stem's stride 2...
        for _ in config.stage_channels[1:]:
            sizes.append((sizes[-1] - 1) // 2 + 1)  # ...and every later stage's
        last = len(config.stage_channels) - 1
        self.heads = nn.ModuleList(
            PooledExitHead(c, size, size, config.num_classes) if i < last else ExitHead(c, config.num_classes)
            for i, (c, size) in enumerate(zip(config.stage_channels, sizes, strict=True))
        )

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every exit, each (B, classes), for images (B, C, H, W) in [0, 1]."""
        outputs = []
        hidden = image
        for stage, head in zip(self.stages, self.heads, strict=True):
            hidden = stage(hidden)
            outputs.append(head(hidden))
        return outputs

    def segmented(self) -> SegmentedNetwork:
        c = self.config
        return SegmentedNetwork(
            segments=[CNNSegment(stage, head) for stage, head in zip(self.stages, self.heads, strict=True)],
            full=FullCNN(list(self.stages), self.heads[-1]),
            inputs=[TensorSpec("IMAGE", "float32", (c.in_channels, c.image_size, c.image_size))],
        )
