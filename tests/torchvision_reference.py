"""What torchvision's own ResNet code computes, recorded, for a test that cannot import torchvision.

torchvision's wheel does not load beside the project's CPU torch (see ``offramp.build.resnet``), so
``tests/data/torchvision_resnet.json`` holds, for resnet18/34/50 with 10 classes, the state_dict keys
and shapes torchvision's ``ResNet`` has and the logits it computes for ``reference_images()`` under
``seeded_state_dict``. They were recorded by running the model code of torchvision 0.28.0
(``torchvision/models/resnet.py`` from its wheel: its model classes, without the package imports
that only its weight enums and builder functions use):

    .venv/bin/python -m tests.torchvision_reference PATH/TO/torchvision/models/resnet.py
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import torch
from torch import nn

RECORDING = Path(__file__).parent / "data" / "torchvision_resnet.json"
ARCHITECTURES = ("resnet18", "resnet34", "resnet50")
NUM_CLASSES = 10


def seeded_state_dict(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights for ``model`` drawn from ``seed`` key by key (sorted), so any implementation with the same
    keys and shapes gets the same values; scaled so that activations stay finite through 50 layers."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in sorted(model.state_dict().items()):
        noise = torch.randn(value.shape, generator=generator) if value.is_floating_point() else None
        if key.endswith("num_batches_tracked"):
            state[key] = torch.zeros_like(value)
        elif key.endswith("running_var"):
            state[key] = 1.0 + 0.5 * noise.abs()
        elif value.dim() > 1:  # conv and linear weights: He-scaled
            state[key] = noise * math.sqrt(2.0 / value[0].numel())
        elif key.endswith("weight"):  # batch-norm scales
            state[key] = 1.0 + 0.1 * noise
        else:  # biases and running means
            state[key] = 0.1 * noise
    return state


def reference_images() -> torch.Tensor:
    """(2, 3, 64, 64): large enough that layer4 still has 2x2 positions to pool."""
    return torch.randn((2, 3, 64, 64), generator=torch.Generator().manual_seed(1))


def load_recording() -> dict:
    return json.loads(RECORDING.read_text())


def _torchvision_resnet_module(path: Path) -> dict:
    """The names torchvision's resnet.py defines up to its model classes (``ResNet`` and its blocks),
    without its package imports, which only the weight enums and builder functions after them use."""
    source = Path(path).read_text()
    model_code = "\n".join(
        line for line in source[: source.index("def _resnet(")].splitlines() if not line.startswith("from .")
    )
    namespace = {"__name__": "torchvision_resnet", "_log_api_usage_once": lambda module: None}
    exec(compile(model_code, str(path), "exec"), namespace)
    return namespace


def record(torchvision_resnet_py: Path) -> dict:
    namespace = _torchvision_resnet_module(torchvision_resnet_py)
    blocks = {"resnet18": ("BasicBlock", [2, 2, 2, 2]), "resnet34": ("BasicBlock", [3, 4, 6, 3]),
              "resnet50": ("Bottleneck", [3, 4, 6, 3])}  # fmt: skip
    recording = {}
    for name in ARCHITECTURES:
        block, layers = blocks[name]
        model = namespace["ResNet"](namespace[block], layers, num_classes=NUM_CLASSES).eval()
        model.load_state_dict(seeded_state_dict(model))
        with torch.no_grad():
            logits = model(reference_images())
        recording[name] = {
            "state_dict": {key: list(value.shape) for key, value in model.state_dict().items()},
            "logits": logits.tolist(),
        }
    return recording


if __name__ == "__main__":
    RECORDING.parent.mkdir(exist_ok=True)
    text = json.dumps(record(Path(sys.argv[1])), indent=1)
    # One line per key: the innermost lists (shapes, rows of logits) on one line each.
    text = re.sub(r"\[\s+([^\[\]]*?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
    RECORDING.write_text(text + "\n")
    print(f"wrote {RECORDING}")
