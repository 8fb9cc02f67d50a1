"""Multi-exit image classifiers from a team's own network and weights: a torchvision ResNet (18/34/50)
or any network written as a stem, a sequence of stages and a head.

The network is cut by structure (``NetworkLayout``): a torchvision ResNet by its module names (stem
conv1/bn1/relu/maxpool, stages layer1..layer4, head avgpool + fc); any other network by the layout
its config names, or by a small protocol: attributes ``stem`` (a module), ``stages`` (a sequence of
modules) and ``head`` (a module). The head's modules run in order, and a ``Linear`` in it sees its
input flattened from dim 1, as torchvision's forward flattens after ``avgpool``.

Exits sit after each stage, or after the stages ``exits`` names, counted from 1 as a text model's
layers are (1: a ResNet's layer1); the last stage always has one, and its head is the network's own,
so the last exit and ``<name>_full`` compute exactly the original network. An early exit's head
(``cnn.PooledExitHead``) average-pools the stage's output to at most 4x4 positions and classifies them with a
two-layer MLP: each costs 0.8-1.5% of a ResNet-18 at 28x28 pixels (1.3-2.7% of a ResNet-50), under
0.1% at 224x224.

Two modes:

- ``attach`` (the network is already trained): the backbone and its own head are frozen, batch-norm
  statistics included. One pass over the training images records each exit's pooled features and the
  own head's output distribution; the exit heads then learn to reproduce that distribution
  (self-distillation: cross-entropy against its softmax), so labels are not needed and unlabelled
  in-domain images serve as well. What early exit is calibrated on - agreement with the full network
  - is what they are trained for.
- ``joint``: backbone, own head and exit heads trained together on the labels (``train_exits``:
  cross-entropy at every exit), from the given weights or from scratch.

Everything that can be wrong with the weights or the request is checked before training.
"""

from __future__ import annotations

import hashlib
import importlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from offramp.backend.contract import TensorSpec
from offramp.backend.image import IMAGE_INPUT, ImageSpec
from offramp.build.artifacts import ModelArtifacts
from offramp.build.build_cache import CachedBuild
from offramp.build.cnn import CNNSegment, FullCNN, PooledExitHead
from offramp.build.export import artifacts_from_network
from offramp.build.image_data import ImageSplits
from offramp.build.resnet import RESNETS, resnet
from offramp.build.segmented import SegmentedNetwork
from offramp.build.train import TrainConfig, predict_exits, seed_everything, train_exits

MODES = ("attach", "joint")
RECIPE = "vision"


class VisionBuildError(ValueError):
    """A build that cannot start: the message names the weights' keys, the exits or the mode at fault."""


@dataclass(frozen=True)
class NetworkLayout:
    """Dotted module names of a network's stem, its stages in order, and its head."""

    stem: tuple[str, ...]
    stages: tuple[str, ...]
    head: tuple[str, ...]


RESNET_LAYOUT = NetworkLayout(
    stem=("conv1", "bn1", "relu", "maxpool"),
    stages=("layer1", "layer2", "layer3", "layer4"),
    head=("avgpool", "fc"),
)


def layout_of(model: nn.Module) -> NetworkLayout:
    """The layout found by structure: torchvision ResNet names, or the stem/stages/head protocol."""
    children = dict(model.named_children())
    if all(name in children for name in (*RESNET_LAYOUT.stem, *RESNET_LAYOUT.stages, *RESNET_LAYOUT.head)):
        return RESNET_LAYOUT
    if {"stem", "stages", "head"} <= set(children):
        stages = tuple(f"stages.{name}" for name, _ in children["stages"].named_children())
        return NetworkLayout(("stem",), stages, ("head",))
    raise VisionBuildError(
        f"{type(model).__name__} is neither a torchvision-style ResNet (conv1, bn1, relu, maxpool, "
        "layer1..layer4, avgpool, fc) nor a network with attributes stem, stages and head: name its "
        "stem, stage and head modules in the config"
    )


class OwnHead(nn.Module):
    """The network's head modules in order: (B, C, H, W) -> (B, classes)."""

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            if isinstance(layer, nn.Linear) and x.dim() > 2:
                x = torch.flatten(x, 1)
            x = layer(x)
        return x


class MultiExitVision(nn.Module):
    """A stem-and-stages network with exit heads after the stages ``exit_after`` names (the last stage's
    exit is the network's own head). Built in evaluation mode: probing the stages' shapes must not move
    the network's batch-norm statistics."""

    def __init__(
        self, network: nn.Module, layout: NetworkLayout, exit_after: Sequence[int], input_spec: TensorSpec
    ) -> None:
        super().__init__()
        self.input_spec = input_spec
        self.exit_after = tuple(exit_after)
        self.stem = nn.Sequential(*(network.get_submodule(name) for name in layout.stem))
        self.stages = nn.ModuleList(network.get_submodule(name) for name in layout.stages)
        self.head = OwnHead([network.get_submodule(name) for name in layout.head])
        self.eval()
        stage_shapes, self.num_classes = self._probe()
        self.exit_heads = nn.ModuleList(
            PooledExitHead(*stage_shapes[stage], self.num_classes) for stage in self.exit_after[:-1]
        )

    @torch.no_grad()
    def _probe(self) -> tuple[list[tuple[int, int, int]], int]:
        """Each stage's output shape (C, H, W) and the class count, from two blank images."""
        first_conv = next((m for m in self.stem.modules() if isinstance(m, nn.Conv2d)), None)
        channels = self.input_spec.shape[0]
        if first_conv is not None and first_conv.in_channels != channels:
            raise VisionBuildError(
                f"the network's first convolution takes {first_conv.in_channels} channels; the preprocessing "
                f"makes {channels}: set its channels to {first_conv.in_channels} (Pillow converts the images)"
            )
        shapes = []
        try:
            for _, hidden in self._stage_outputs(torch.zeros((2, *self.input_spec.shape))):
                shapes.append(tuple(hidden.shape[1:]))  # (C, H, W)
            logits = self.head(hidden)
        except RuntimeError as error:
            raise VisionBuildError(
                f"the network does not take images of shape {self.input_spec.shape} (channels, height, "
                f"width, as the preprocessing makes them): {error}"
            ) from None
        return shapes, logits.shape[1]

    @property
    def backbone(self) -> list[nn.Module]:
        return [self.stem, *self.stages, self.head]

    @property
    def heads(self) -> list[nn.Module]:
        """Exit k's head: a PooledExitHead, or the network's own for the last exit."""
        return [*self.exit_heads, self.head]

    def _stage_outputs(self, image: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        """(stage index, its output (B, C, H, W)) for each stage, from images (B, C, H, W)."""
        hidden = self.stem(image)
        for index, stage in enumerate(self.stages):
            hidden = stage(hidden)
            yield index, hidden

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every exit, each (B, classes), for preprocessed images (B, C, H, W)."""
        exits = dict(zip(self.exit_after, self.heads, strict=True))
        return [exits[index](hidden) for index, hidden in self._stage_outputs(image) if index in exits]

    @torch.no_grad()
    def pooled_features(
        self, images: np.ndarray, batch_size: int = 256
    ) -> tuple[list[np.ndarray], np.ndarray]:
        """What attach-mode training needs of the frozen backbone: each early exit's pooled features
        (N, C, g, g) and the own head's logits (N, classes)."""
        early = {stage: position for position, stage in enumerate(self.exit_after[:-1])}
        features: list[list[np.ndarray]] = [[] for _ in self.exit_heads]
        final = []
        for start in range(0, len(images), batch_size):
            for index, hidden in self._stage_outputs(torch.from_numpy(images[start : start + batch_size])):
                if index in early:
                    features[early[index]].append(self.exit_heads[early[index]].pool(hidden).numpy())
            final.append(self.head(hidden).numpy())  # after the last stage
        return [np.concatenate(f) for f in features], np.concatenate(final)

    def segmented(self) -> SegmentedNetwork:
        """Segment k: the stages after exit k-1 up to exit k (the first with the stem) and exit k's head."""
        segments = []
        first = 0
        for index, (last, head) in enumerate(zip(self.exit_after, self.heads, strict=True)):
            bodies = [*([self.stem] if index == 0 else []), *self.stages[first : last + 1]]
            segments.append(CNNSegment(nn.Sequential(*bodies), head))
            first = last + 1
        return SegmentedNetwork(
            segments=segments,
            full=FullCNN([self.stem, *self.stages], self.head),
            inputs=[self.input_spec],
        )


class _ExitClassifiers(nn.Module):
    """The early exits' classifiers over their pooled features: what attach mode trains."""

    def __init__(self, heads: Sequence[PooledExitHead]) -> None:
        super().__init__()
        self.classifiers = nn.ModuleList(head.classifier for head in heads)

    def forward(self, *features: torch.Tensor) -> list[torch.Tensor]:
        return [classifier(f) for classifier, f in zip(self.classifiers, features, strict=True)]


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """A ``state_dict`` saved with ``torch.save(model.state_dict(), path)`` (tensors only: loaded safely)."""
    path = Path(path)
    if not path.is_file():
        raise VisionBuildError(f"weights {path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise VisionBuildError(f"weights {path} do not load as a state_dict ({error})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise VisionBuildError(f"weights {path} are not a state_dict of tensors: save model.state_dict()")
    return state


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Loads ``state`` into ``model``, or says which keys are missing, unexpected or of another shape."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [
        f"{k} {tuple(state[k].shape)} (the architecture has {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = [
        f"{len(items)} {what}: {', '.join(items[:8])}{', ...' if len(items) > 8 else ''}"
        for what, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("of another shape", reshaped),
        )
        if items
    ]
    if problems:
        # A wrapper (DataParallel, a Lightning module) saved its own prefix on every key.
        prefixes = {key.split(".", 1)[0] + "." for key in unexpected}
        prefix = next(iter(prefixes)) if len(prefixes) == 1 and missing else None
        if prefix and {key.removeprefix(prefix) for key in unexpected} >= set(missing):
            problems.append(
                f"every key carries the prefix {prefix!r}: save the wrapped model's own state_dict"
            )
        raise VisionBuildError(f"weights {source} do not fit {type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict(state)


def backbone_network(
    architecture: str, state: dict[str, torch.Tensor] | None, num_classes: int, channels: int
) -> nn.Module:
    """The bare network: a ResNet shaped by its weights where given (classes, input channels, width),
    else by the data; or ``package.module:factory`` called without arguments."""
    if architecture in RESNETS:
        if state is not None and "fc.weight" in state and "conv1.weight" in state:
            num_classes = state["fc.weight"].shape[0]
            width, channels = state["conv1.weight"].shape[:2]
            return resnet(architecture, num_classes, channels, width)
        return resnet(architecture, num_classes, channels)
    module_name, _, factory = architecture.partition(":")
    if not factory:
        raise VisionBuildError(
            f"unknown architecture {architecture!r}: one of {sorted(RESNETS)}, or 'package.module:factory' "
            "for a network with a stem, stages and a head"
        )
    try:
        return getattr(importlib.import_module(module_name), factory)()
    except (ImportError, AttributeError) as error:
        raise VisionBuildError(f"architecture {architecture!r}: {error}") from None


def exit_stages(exits: Sequence[int] | None, num_stages: int) -> tuple[int, ...]:
    """The indices (from 0) of the stages with an exit, sorted, from stage numbers counted from 1; every
    stage when None; the last stage always."""
    if exits is None:
        return tuple(range(num_stages))
    wrong = [e for e in exits if not isinstance(e, int) or not 1 <= e <= num_stages]
    if wrong or len(set(exits)) != len(exits):
        raise VisionBuildError(
            f"exits {list(exits)} must be distinct stage numbers in [1, {num_stages}] (1: the first stage)"
        )
    return tuple(sorted({*(e - 1 for e in exits), num_stages - 1}))


def _data_fingerprint(splits: ImageSplits) -> str:
    digest = hashlib.sha256()
    for part in (splits.train, splits.calibration, splits.test):
        digest.update(np.ascontiguousarray(part.images).tobytes())
        digest.update(np.ascontiguousarray(part.labels).tobytes())
    return digest.hexdigest()[:16]


def build_vision_classifier(
    out_dir: Path,
    *,
    name: str,
    architecture: str,
    weights: Path | None,
    splits: ImageSplits,
    exits: Sequence[int] | None,
    mode: str,
    train: TrainConfig,
    preprocess: ImageSpec,
    progress: bool = True,
    layout: NetworkLayout | None = None,
) -> ModelArtifacts:
    """Trains exit heads onto ``architecture`` (attach) or the whole network with them (joint), exports
    it to ``out_dir`` with the preprocessing and class names in its manifest, saves it and returns it.
    A build with the same inputs (weights and data by content) is reused.

    ``architecture``: resnet18, resnet34, resnet50, or ``package.module:factory``; ``layout`` names its
    stem, stages and head where they are not found by structure (``layout_of``).
    """
    if mode not in MODES:
        raise VisionBuildError(f"mode must be one of {MODES}, not {mode!r}")
    if mode == "attach" and weights is None:
        raise VisionBuildError("attach mode freezes a trained network: give its weights (a state_dict file)")
    if mode == "joint" and not splits.train.labelled:
        raise VisionBuildError("joint mode trains on labels: the training images are unlabelled (use attach)")
    if preprocess != splits.preprocess:
        raise VisionBuildError(f"the images were preprocessed as {splits.preprocess}, not as {preprocess}")
    seed_everything(train.seed)  # the initial weights of the exit heads (and of a joint build from scratch)
    state = load_weights(weights) if weights is not None else None
    network = backbone_network(architecture, state, len(splits.class_names), preprocess.channels)
    if state is not None:
        load_into(network, state, weights)
    layout = layout or layout_of(network)
    stages = exit_stages(exits, len(layout.stages))
    multi_exit = MultiExitVision(
        network, layout, stages, TensorSpec(IMAGE_INPUT, "float32", preprocess.shape)
    )
    if splits.class_names and multi_exit.num_classes != len(splits.class_names):
        names = ", ".join(splits.class_names[:5]) + (", ..." if len(splits.class_names) > 5 else "")
        raise VisionBuildError(
            f"{architecture} classifies into {multi_exit.num_classes} classes; the data has "
            f"{len(splits.class_names)} ({names})"
        )
    class_names = splits.class_names or tuple(str(i) for i in range(multi_exit.num_classes))

    out_dir = Path(out_dir)
    cache = CachedBuild.look_up(
        out_dir,
        recipe=RECIPE,
        name=name,
        architecture=architecture,
        layout=asdict(layout),
        weights=hashlib.sha256(Path(weights).read_bytes()).hexdigest() if weights is not None else None,
        data=_data_fingerprint(splits),
        exits=stages,
        mode=mode,
        train=train.record(),
        preprocess=preprocess.to_dict(),
    )
    if cache.reusable is not None:
        return cache.reusable
    out_dir.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    if mode == "attach":
        losses = train_attached(multi_exit, splits.train.images, train, progress)
    else:
        losses = train_exits(multi_exit, [splits.train.images], splits.train.labels, train, progress=progress)
    train_seconds = time.perf_counter() - started

    multi_exit.eval()
    test_logits = predict_exits(multi_exit, [splits.test.images])  # (exits, N, C)
    agreement = [float((logits.argmax(1) == test_logits[-1].argmax(1)).mean()) for logits in test_logits]
    accuracy = {}
    if splits.test.labelled:
        exit_accuracy = [float((logits.argmax(1) == splits.test.labels).mean()) for logits in test_logits]
        accuracy = {"exit_test_accuracy": tuple(exit_accuracy), "full_test_accuracy": exit_accuracy[-1]}
    artifacts = artifacts_from_network(
        name,
        multi_exit.segmented(),
        class_names,
        out_dir,
        **accuracy,
        build={
            "key": cache.key,
            "recipe": RECIPE,
            "architecture": architecture,
            "layout": asdict(layout),
            "mode": mode,
            "weights": str(weights) if weights is not None else None,
            "exit_stages": [stage + 1 for stage in stages],  # counted from 1, as ``exits``
            "image": preprocess.to_dict(),
            "data": splits.source,  # what offramp calibrate loads the held-out images from
            "train": train.record(),
            "train_rows": len(splits.train.labels),
            "calibration_rows": len(splits.calibration.labels),
            "test_rows": len(splits.test.labels),
            "exit_test_agreement": agreement,
            "epoch_losses": losses,
            "train_seconds": round(train_seconds, 1),
            "torch": torch.__version__,
        },
    )
    artifacts.save(out_dir)
    return artifacts


def train_attached(
    model: MultiExitVision, images: np.ndarray, config: TrainConfig, progress: bool
) -> list[float]:
    """Attach mode: the backbone and its own head frozen (evaluation mode: batch-norm statistics too);
    the exit heads' classifiers trained on the pooled features of one pass over ``images`` towards the
    own head's output distribution (at ``config.distill_temperature``; no labels). Returns the epoch
    losses (summed over exits)."""
    for module in model.backbone:
        module.requires_grad_(False)
    model.eval()
    rows = len(images) if config.max_train_rows is None else min(len(images), config.max_train_rows)
    features, final_logits = model.pooled_features(images[:rows])
    unlabelled = np.full(rows, -1, dtype=np.int64)  # every row learns from the teacher alone
    heads = _ExitClassifiers(list(model.exit_heads))
    return train_exits(heads, features, unlabelled, config, teacher=final_logits, progress=progress)
