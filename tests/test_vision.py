"""Multi-exit image classifiers from a team's network: torchvision's ResNets by key, cutting by structure,
attach and joint builds whose last exit and full model are the original network, and clear errors."""

from __future__ import annotations

import os
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from offramp.backend.contract import TensorSpec
from offramp.backend.image import IMAGE_INPUT, ImageSpec
from offramp.backend.segment_runner import OnnxRunner
from offramp.build.artifacts import ModelArtifacts
from offramp.build.calibrate import exit_logits_from_onnx, held_out_data
from offramp.build.image_data import ImageSet, ImageSplits, load_image_splits
from offramp.build.resnet import resnet
from offramp.build.train import TrainConfig
from offramp.build.vision import (
    RESNET_LAYOUT,
    MultiExitVision,
    NetworkLayout,
    VisionBuildError,
    build_vision_classifier,
    exit_stages,
    layout_of,
    load_into,
    load_weights,
)
from tests.torchvision_reference import ARCHITECTURES, load_recording, reference_images, seeded_state_dict

QUICK = TrainConfig(epochs=2, batch_size=64)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_resnets_have_torchvisions_keys_shapes_and_logits(architecture):
    recorded = load_recording()[architecture]
    model = resnet(architecture, num_classes=10).eval()
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == recorded["state_dict"]
    assert list(model.state_dict()) == list(recorded["state_dict"])  # the same order, too
    model.load_state_dict(seeded_state_dict(model))
    with torch.no_grad():
        logits = model(reference_images())
    expected = torch.tensor(recorded["logits"])
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_weights_that_do_not_fit_name_their_keys(tmp_path):
    model = resnet("resnet18", num_classes=10)
    with pytest.raises(VisionBuildError, match=r"unexpected keys: layer1\.2\.conv1\.weight"):
        load_into(model, resnet("resnet34", num_classes=10).state_dict(), tmp_path / "r34.pt")
    state = model.state_dict()
    state["head.weight"] = state.pop("fc.weight")
    state["fc.bias"] = torch.zeros(5)
    with pytest.raises(VisionBuildError) as caught:
        load_into(model, state, tmp_path / "renamed.pt")
    message = str(caught.value)
    assert "1 missing keys: fc.weight" in message and "1 unexpected keys: head.weight" in message
    assert "fc.bias (5,) (the architecture has (10,))" in message


def test_weights_saved_from_a_wrapper_say_so(tmp_path):
    model = resnet("resnet18", num_classes=10, width=8)
    wrapped = {f"module.{key}": value for key, value in model.state_dict().items()}
    with pytest.raises(VisionBuildError, match="every key carries the prefix 'module.'"):
        load_into(model, wrapped, tmp_path / "parallel.pt")


def test_weights_must_be_a_state_dict(tmp_path):
    with pytest.raises(VisionBuildError, match="not found"):
        load_weights(tmp_path / "missing.pt")
    torch.save({"model": "resnet18", "epoch": 3}, tmp_path / "checkpoint.pt")
    with pytest.raises(VisionBuildError, match="not a state_dict of tensors"):
        load_weights(tmp_path / "checkpoint.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(VisionBuildError, match="do not load as a state_dict"):
        load_weights(tmp_path / "junk.pt")


class StagedNet(nn.Module):
    """A network in the stem/stages/head protocol (built by the generic architecture 'module:factory')."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.stages = nn.Sequential(
            nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU()),
            nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU()),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


def test_layouts_are_found_by_structure():
    assert layout_of(resnet("resnet50", 10)) == RESNET_LAYOUT
    assert layout_of(StagedNet()) == NetworkLayout(("stem",), ("stages.0", "stages.1"), ("head",))
    with pytest.raises(VisionBuildError, match="name its stem, stage and head modules"):
        layout_of(nn.Sequential(nn.Linear(2, 2)))


class NamedNet(nn.Module):
    """A network whose stem, stages and head only a layout can name."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, 2, 1)
        self.act = nn.ReLU()
        self.block_a = nn.Conv2d(4, 8, 3, 2, 1)
        self.block_b = nn.Conv2d(8, 8, 3, 1, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.block_b(self.block_a(self.act(self.conv(x))))
        return self.classifier(torch.flatten(self.pool(hidden), 1))


def test_a_named_layout_cuts_any_network():
    net = NamedNet().eval()
    layout = NetworkLayout(stem=("conv", "act"), stages=("block_a", "block_b"), head=("pool", "classifier"))
    multi_exit = MultiExitVision(net, layout, (0, 1), TensorSpec(IMAGE_INPUT, "float32", (1, 16, 16)))
    images = torch.rand((3, 1, 16, 16))
    with torch.no_grad():
        first, last = multi_exit(images)
        torch.testing.assert_close(last, net(images), rtol=0, atol=0)
        torch.testing.assert_close(multi_exit.segmented().full(images), net(images), rtol=0, atol=0)
    assert first.shape == (3, 3) and multi_exit.num_classes == 3


def test_a_network_that_does_not_take_the_preprocessed_shape_says_so():
    net = NamedNet()
    net.pool = nn.Identity()  # the classifier now needs the 1x1 map of a 4x4 image
    layout = NetworkLayout(stem=("conv", "act"), stages=("block_a", "block_b"), head=("pool", "classifier"))
    with pytest.raises(VisionBuildError, match=r"does not take images of shape \(1, 16, 16\)"):
        MultiExitVision(net, layout, (0, 1), TensorSpec(IMAGE_INPUT, "float32", (1, 16, 16)))


def test_exit_stages_are_counted_from_one():
    assert exit_stages(None, 4) == (0, 1, 2, 3)
    assert exit_stages([3, 1], 4) == (0, 2, 3)  # the last stage always has an exit
    for wrong in ([5], [0], [1, 1]):
        with pytest.raises(VisionBuildError, match=r"distinct stage numbers in \[1, 4\]"):
            exit_stages(wrong, 4)


# ---------------------------------------------------------------------------------------------
# Builds


SPEC = ImageSpec(channels=1, size=28, mean=(0.286,), std=(0.353,))


@pytest.fixture(scope="module")
def fashion_splits(fashion_test) -> ImageSplits:
    images, labels = fashion_test
    normalized = SPEC.normalize(np.rint(images[:900] * 255).astype(np.uint8))

    def part(rows: slice) -> ImageSet:
        return ImageSet(normalized[rows], labels[:900][rows])

    names = tuple(f"class {i}" for i in range(10))
    return ImageSplits(part(slice(0, 600)), part(slice(600, 750)), part(slice(750, 900)), names, SPEC)


def team_network(architecture: str = "resnet18") -> nn.Module:
    """The team's own network: a small-width ResNet with non-trivial weights and batch-norm statistics."""
    model = resnet(architecture, num_classes=10, in_channels=1, width=8)
    model.load_state_dict(seeded_state_dict(model, seed=3))
    return model.eval()


@pytest.fixture(scope="module")
def attached(fashion_splits, tmp_path_factory):
    directory = tmp_path_factory.mktemp("attached")
    team = team_network()
    torch.save(team.state_dict(), directory / "team.pt")
    artifacts = build_vision_classifier(
        directory / "build",
        name="tiny_resnet",
        architecture="resnet18",
        weights=directory / "team.pt",
        splits=fashion_splits,
        exits=None,
        mode="attach",
        train=QUICK,
        preprocess=SPEC,
        progress=False,
    )
    return artifacts, directory / "build", team


def test_attach_keeps_the_original_network_as_full_model_and_last_exit(attached, fashion_splits):
    artifacts, directory, team = attached
    images = fashion_splits.test.images
    with torch.no_grad():
        original = team(torch.from_numpy(images)).numpy()
    full = OnnxRunner(directory / artifacts.full_onnx).run({IMAGE_INPUT: images})["LOGITS"]
    last_exit = exit_logits_from_onnx(artifacts, directory, {IMAGE_INPUT: images})[-1]
    tolerance = 1e-5 * np.abs(original).max()
    np.testing.assert_allclose(full, original, rtol=0, atol=tolerance)
    np.testing.assert_allclose(last_exit, original, rtol=0, atol=tolerance)


def test_attach_trains_only_the_exit_heads(attached, tmp_path):
    artifacts, _, team = attached
    untouched = team_network()
    for key, value in untouched.state_dict().items():
        torch.testing.assert_close(team.state_dict()[key], value, rtol=0, atol=0, msg=key)
    losses = artifacts.build["epoch_losses"]
    assert losses[-1] < losses[0], "distillation should lower the heads' loss"


def test_the_manifest_records_the_build(attached):
    artifacts, _, _ = attached
    assert artifacts.num_exits == 4 and artifacts.build["exit_stages"] == [1, 2, 3, 4]
    assert ImageSpec.from_dict(artifacts.build["image"]) == SPEC
    assert artifacts.inputs[0].name == IMAGE_INPUT and artifacts.inputs[0].shape == SPEC.shape
    assert artifacts.class_names == tuple(f"class {i}" for i in range(10))
    assert list(artifacts.exit_costs) == sorted(artifacts.exit_costs) and artifacts.exit_costs[-1] >= 1.0
    assert artifacts.build["exit_test_agreement"][-1] == 1.0 and len(artifacts.exit_test_accuracy) == 4


def test_the_same_build_is_reused(attached, fashion_splits):
    artifacts, directory, _ = attached
    manifest = directory / "manifest.json"
    written = os.stat(manifest).st_mtime_ns
    again = build_vision_classifier(
        directory,
        name="tiny_resnet",
        architecture="resnet18",
        weights=directory.parent / "team.pt",
        splits=fashion_splits,
        exits=[1, 2, 3, 4],
        mode="attach",
        train=QUICK,
        preprocess=SPEC,
        progress=False,
    )
    assert again.build["key"] == artifacts.build["key"] and again.fingerprint == artifacts.fingerprint
    assert os.stat(manifest).st_mtime_ns == written


def test_joint_trains_the_backbone_with_its_heads(fashion_splits, tmp_path):
    artifacts = build_vision_classifier(
        tmp_path / "joint",
        name="joint",
        architecture="tests.test_vision:StagedNet",
        weights=None,
        splits=fashion_splits,
        exits=[1],
        mode="joint",
        train=TrainConfig(epochs=6, batch_size=32),
        preprocess=SPEC,
        progress=False,
    )
    assert artifacts.num_exits == 2 and artifacts.build["mode"] == "joint"
    losses = artifacts.build["epoch_losses"]
    assert losses[-1] < losses[0]
    assert artifacts.full_test_accuracy > 0.4, "six epochs on 600 images should beat chance by far"


def test_a_generic_network_attached_keeps_its_logits_and_its_data_is_recorded(fashion_test, tmp_path):
    images, labels = fashion_test
    np.savez(tmp_path / "team.npz", images=np.rint(images[:300] * 255).astype(np.uint8), labels=labels[:300])
    splits = load_image_splits(tmp_path / "team.npz", None, None, (0.6, 0.2, 0.2), 0, None, preprocess=SPEC)
    net = StagedNet().eval()
    torch.save(net.state_dict(), tmp_path / "net.pt")
    artifacts = build_vision_classifier(
        tmp_path / "generic",
        name="generic",
        architecture="tests.test_vision:StagedNet",
        weights=tmp_path / "net.pt",
        splits=splits,
        exits=None,
        mode="attach",
        train=QUICK,
        preprocess=SPEC,
        progress=False,
    )
    test_images = splits.test.images
    with torch.no_grad():
        original = net(torch.from_numpy(test_images)).numpy()
    full = OnnxRunner(tmp_path / "generic" / artifacts.full_onnx).run({IMAGE_INPUT: test_images})["LOGITS"]
    np.testing.assert_allclose(full, original, rtol=0, atol=1e-5 * np.abs(original).max())
    # offramp calibrate loads the same held-out images again from what the manifest records.
    calibration = held_out_data(ModelArtifacts.load(tmp_path / "generic"), tmp_path / "generic")
    np.testing.assert_array_equal(calibration.inputs[IMAGE_INPUT], splits.calibration.images)
    np.testing.assert_array_equal(calibration.labels, splits.calibration.labels)


def test_splits_made_by_hand_record_no_data(attached):
    artifacts, directory, _ = attached
    with pytest.raises(ValueError, match="records no data to hold out"):
        held_out_data(artifacts, directory)


def build_error(tmp_path, base: ImageSplits, **overrides) -> str:
    arguments = dict(
        name="bad",
        architecture="resnet18",
        weights=None,
        splits=base,
        exits=None,
        mode="joint",
        train=QUICK,
        preprocess=base.preprocess,
        progress=False,
    )
    with pytest.raises(VisionBuildError) as caught:
        build_vision_classifier(tmp_path / "bad", **(arguments | overrides))
    assert not (tmp_path / "bad").exists(), "nothing is written before the checks pass"
    return str(caught.value)


def test_builds_that_cannot_start_say_why(fashion_splits, tmp_path):
    rgb = resnet("resnet18", num_classes=10, width=8)  # 3 input channels
    torch.save(rgb.state_dict(), tmp_path / "rgb.pt")
    five = resnet("resnet18", num_classes=5, in_channels=1, width=8)
    torch.save(five.state_dict(), tmp_path / "five.pt")
    unlabelled = ImageSet(fashion_splits.train.images, np.full(600, -1))
    cases = [
        (dict(mode="attach"), "attach mode freezes a trained network: give its weights"),
        (dict(mode="distil"), "mode must be one of"),
        (dict(splits=replace(fashion_splits, train=unlabelled)), "joint mode trains on labels"),
        (dict(preprocess=ImageSpec(1, 28)), "the images were preprocessed as"),
        (
            dict(weights=tmp_path / "rgb.pt", mode="attach"),
            "first convolution takes 3 channels; the preprocessing makes 1: set its channels to 3",
        ),
        (dict(weights=tmp_path / "five.pt", mode="attach"), "classifies into 5 classes; the data has 10"),
        (dict(architecture="vgg11"), "unknown architecture 'vgg11'"),
        (dict(architecture="no_such_module:Net"), "No module named 'no_such_module'"),
        (dict(exits=[7]), r"distinct stage numbers in \[1, 4\]"),
    ]
    for overrides, message in cases:
        assert re.search(message, build_error(tmp_path, fashion_splits, **overrides)), message


def test_unlabelled_images_serve_an_attach_build(fashion_splits, tmp_path):
    torch.save(team_network().state_dict(), tmp_path / "team.pt")
    unlabelled = ImageSet(fashion_splits.train.images, np.full(600, -1))
    splits = replace(fashion_splits, train=unlabelled, class_names=())
    artifacts = build_vision_classifier(
        tmp_path / "unlabelled",
        name="unlabelled",
        architecture="resnet18",
        weights=tmp_path / "team.pt",
        splits=splits,
        exits=[2],
        mode="attach",
        train=QUICK,
        preprocess=SPEC,
        progress=False,
    )
    assert artifacts.num_exits == 2 and artifacts.class_names == tuple(str(i) for i in range(10))
