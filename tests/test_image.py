"""Images in the orchestrator: JPEG/PNG bytes decoded and preprocessed per request, a bad image failing
its own request only; the spec's round trip; the repository's image inputs."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from offramp.backend import image as image_module
from offramp.backend.contract import HIDDEN_IN, TensorSpec
from offramp.backend.image import (
    IMAGE_BYTES_INPUT,
    IMAGE_INPUT,
    ImageDecoder,
    ImageError,
    ImageSpec,
    encode_png,
    open_image,
    pixels_of,
)
from offramp.backend.orchestrator import Orchestrator, OrchestratorSpec, RequestError
from offramp.backend.policy import ExitRule, Policy
from offramp.build import execution_env
from offramp.build.artifacts import ModelArtifacts, SegmentArtifact
from offramp.build.repository import orchestrator_inputs, orchestrator_spec

SPEC = ImageSpec(channels=1, size=8, resize=10, mean=(0.5,), std=(0.25,))


def encoded(pixels: np.ndarray, format: str = "PNG", mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(pixels)
    (image.convert(mode) if mode else image).save(buffer, format=format)
    return buffer.getvalue()


def photos(rows: int, height: int = 12, width: int = 15, seed: int = 0) -> np.ndarray:
    """uint8 (rows, H, W, 3): noise plus a per-row brightness, so rows differ in class."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 80, (rows, height, width, 3))
    return (base + np.linspace(0, 170, rows)[:, None, None, None]).astype(np.uint8)


def bytes_rows(blobs: list[bytes]) -> np.ndarray:
    return np.array(blobs, dtype=np.object_).reshape(-1, 1)  # as Triton hands BYTES [-1, 1] over


# ---------------------------------------------------------------------------------------------
# The spec and the preprocessing


def test_spec_round_trips_through_json():
    spec = ImageSpec(channels=3, size=224, resize=256, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    assert ImageSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert spec.shape == (3, 224, 224)


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(channels=2, size=8), "channels must be 1"),
        (dict(channels=1, size=8, resize=6), "resize"),
        (dict(channels=3, size=8, mean=(0.5,), std=(0.5,)), "one value per channel"),
        (dict(channels=1, size=8, std=(0.0,)), "std must be positive"),
    ],
)
def test_impossible_specs_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        ImageSpec(**fields)


def test_centre_crop_and_shorter_side_resize_follow_torchvision():
    # 7 wide, 4 high, size 4, no resize: torchvision's CenterCrop takes columns round(1.5) = 2 .. 5.
    pixels = np.arange(28, dtype=np.uint8).reshape(4, 7)
    cropped = pixels_of(Image.fromarray(pixels), ImageSpec(1, 4))
    np.testing.assert_array_equal(cropped[0], pixels[:, 2:6])
    # Resize(10) of 30x15: the shorter side 10, the longer int(10 * 30 / 15) = 20; then the centre 8x8.
    image = Image.fromarray(photos(1, height=15, width=30)[0])
    resized = np.asarray(image.convert("L").resize((20, 10), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(pixels_of(image, SPEC)[0], resized[1:9, 6:14])


def test_png_bytes_give_the_tensor_of_their_pixels():
    pixels = photos(3, height=8, width=8)  # at the spec's size: no resampling
    gray = np.stack([np.asarray(Image.fromarray(p).convert("L")) for p in pixels])[:, None]  # (3, 1, 8, 8)
    decoded = ImageDecoder(ImageSpec(1, 8, mean=(0.5,), std=(0.25,))).decode(
        bytes_rows([encoded(p) for p in pixels])
    )
    assert decoded.dtype == np.float32 and decoded.shape == (3, 1, 8, 8)
    np.testing.assert_allclose(decoded, (gray / 255.0 - 0.5) / 0.25, rtol=0, atol=1e-6)
    colour = ImageDecoder(ImageSpec(3, 8, mean=(0, 0, 0), std=(1, 1, 1))).decode(
        bytes_rows([encode_png(pixels[0].transpose(2, 0, 1))])
    )
    np.testing.assert_allclose(colour[0], pixels[0].transpose(2, 0, 1) / 255.0, rtol=0, atol=1e-6)


def test_jpeg_and_every_eight_bit_mode_decode():
    pixels = photos(1)[0]
    blobs = [
        encoded(pixels, "JPEG"),
        *(encoded(pixels, "PNG", mode) for mode in ("1", "L", "LA", "P", "RGBA")),
    ]
    blobs.append(encoded(pixels, "JPEG", "CMYK"))
    decoded = ImageDecoder(SPEC).decode(bytes_rows(blobs))
    assert decoded.shape == (len(blobs), *SPEC.shape) and np.isfinite(decoded).all()


@pytest.mark.parametrize(
    "blob,message",
    [
        (b"not an image", r"row 1 is not a JPEG or PNG image"),
        (encoded(photos(1)[0])[:60], r"row 1 (does not decode|is not a readable)"),
        (encoded(np.zeros((4, 4), np.uint16)), r"row 1 has mode 'I;16' \(not 8-bit pixels\)"),
        (encoded(photos(1)[0], "GIF"), r"row 1 is not a JPEG or PNG image"),
        ("a string", r"row 1 must be bytes, not str"),
    ],
)
def test_an_image_that_cannot_be_served_is_named_by_its_row(blob, message):
    rows = np.array([encoded(photos(1)[0]), blob], dtype=np.object_)
    with pytest.raises(ImageError, match=message):
        ImageDecoder(SPEC).decode(rows)


def test_a_huge_declared_image_is_refused_before_decoding(monkeypatch):
    monkeypatch.setattr(image_module, "MAX_PIXELS", 100)
    with pytest.raises(ImageError, match="is 12x12 pixels; at most 100"):
        open_image(encoded(np.zeros((12, 12), np.uint8)))


# ---------------------------------------------------------------------------------------------
# In the orchestrator


ORCHESTRATOR_SPEC = OrchestratorSpec(
    model_name="img",
    segment_models=("img_segment_0", "img_segment_1"),
    full_model="img_full",
    inputs=(TensorSpec(IMAGE_INPUT, "float32", SPEC.shape),),
    side_inputs=(),
    exit_costs=(0.5, 1.0),
    class_names=("dark", "light"),
    fingerprint="fp",
    image=SPEC,
)


class FakeRequest:
    def __init__(self, inputs: dict, parameters: dict | None = None):
        self.inputs = inputs
        self.params = parameters or {}

    def input(self, name):
        return self.inputs.get(name)

    def parameters(self):
        return self.params


def run_segment(index, tensors, need_hidden):
    """Row-wise: a row's logits are its mean pixel, sharper at the second exit."""
    images = tensors[IMAGE_INPUT] if index == 0 else tensors[HIDDEN_IN]  # (n, 1, 8, 8)
    brightness = images.mean(axis=(1, 2, 3))
    logits = np.stack([-brightness, brightness], axis=1) * (2 + 6 * index)
    return (images if need_hidden else None), logits.astype(np.float32)


def run_model(name, tensors):
    return run_segment(1, {HIDDEN_IN: tensors[IMAGE_INPUT]}, False)[1]


@pytest.fixture
def orchestrator():
    policy = Policy("p1", "fp", (ExitRule("max_prob", 0.9), ExitRule("max_prob", 0.0)))
    return Orchestrator(ORCHESTRATOR_SPEC, policy, image_decoder=ImageDecoder(SPEC))


def test_image_bytes_are_answered_as_their_preprocessed_tensors(orchestrator):
    blobs = [encoded(p, "JPEG" if i % 2 else "PNG") for i, p in enumerate(photos(6))]
    tensors = ImageDecoder(SPEC).decode(bytes_rows(blobs))
    by_bytes, by_tensor = orchestrator.execute(
        [FakeRequest({IMAGE_BYTES_INPUT: bytes_rows(blobs)}), FakeRequest({IMAGE_INPUT: tensors})],
        run_segment,
        run_model,
    )
    assert set(by_bytes["EXIT"].tolist()) == {0, 1}, "both exits should answer some rows"
    for name in by_tensor:
        np.testing.assert_array_equal(by_bytes[name], by_tensor[name], err_msg=name)


@pytest.mark.parametrize(
    "inputs,message",
    [
        ({IMAGE_BYTES_INPUT: bytes_rows([encoded(photos(1)[0]), b"\x89PNG broken"])}, "IMAGE_BYTES row 1"),
        ({IMAGE_BYTES_INPUT: np.zeros((2, 1), np.float32)}, "'IMAGE_BYTES' must be BYTES, not float32"),
        (
            {
                IMAGE_BYTES_INPUT: bytes_rows([encoded(photos(1)[0])]),
                IMAGE_INPUT: np.zeros((1, 1, 8, 8), np.float32),
            },
            "send either IMAGE_BYTES or",
        ),
        ({}, r"input 'IMAGE' is missing \(or send IMAGE_BYTES\)"),
        ({IMAGE_BYTES_INPUT: bytes_rows([])}, "no rows"),
    ],
)
def test_a_bad_image_request_fails_alone(orchestrator, inputs, message):
    good = [
        FakeRequest({IMAGE_BYTES_INPUT: bytes_rows([encoded(p) for p in photos(3, seed=s)])}) for s in (1, 2)
    ]
    answers = orchestrator.execute([good[0], FakeRequest(inputs), good[1]], run_segment, run_model)
    assert isinstance(answers[1], RequestError) and re.search(message, str(answers[1])), answers[1]
    for request, answer in zip(good, (answers[0], answers[2])):
        alone = orchestrator.execute([request], run_segment, run_model)[0]
        for name in alone:
            np.testing.assert_array_equal(answer[name], alone[name], err_msg=name)


def test_the_orchestrator_spec_keeps_its_image_spec(tmp_path):
    path = ORCHESTRATOR_SPEC.save(tmp_path / "orchestrator.json")
    assert OrchestratorSpec.load(path) == ORCHESTRATOR_SPEC


# ---------------------------------------------------------------------------------------------
# The repository and the stock server's environment


def image_artifacts(image: ImageSpec | None) -> ModelArtifacts:
    hidden = TensorSpec("hidden", "float32", (4, 2, 2))
    return ModelArtifacts(
        name="img",
        inputs=(TensorSpec(IMAGE_INPUT, "float32", SPEC.shape),),
        side_inputs=(),
        class_names=("dark", "light"),
        segments=(SegmentArtifact("segment_0.onnx", (IMAGE_INPUT,), hidden, 10, 1.0),),
        full_onnx="full.onnx",
        full_macs=10,
        fingerprint="fp",
        build={"image": image.to_dict()} if image else {},
    )


def test_an_image_build_takes_image_bytes_beside_its_tensor():
    inputs = orchestrator_inputs(image_artifacts(SPEC))
    assert [(t.name, t.dtype, t.dims, t.optional) for t in inputs] == [
        (IMAGE_INPUT, "float32", SPEC.shape, True),
        (IMAGE_BYTES_INPUT, "object", (), True),  # on the wire [-1, 1]
    ]
    assert orchestrator_spec(image_artifacts(SPEC)).image == SPEC
    plain = image_artifacts(None)
    assert [t.name for t in orchestrator_inputs(plain)] == [IMAGE_INPUT] and not orchestrator_inputs(plain)[
        0
    ].optional
    assert orchestrator_spec(plain).image is None


def test_the_orchestrator_of_other_models_runs_without_pillow():
    blocked = (
        "import sys; sys.modules['PIL'] = None; import offramp.backend.orchestrator, offramp.backend.image"
    )
    assert subprocess.run([sys.executable, "-c", blocked]).returncode == 0
    with_images = blocked + "; offramp.backend.image.ImageDecoder(offramp.backend.image.ImageSpec(1, 8))"
    failed = subprocess.run([sys.executable, "-c", with_images], capture_output=True, text=True)
    assert failed.returncode != 0 and "PIL" in failed.stderr


def test_a_stock_server_environment_for_images_has_pillow():
    assert execution_env.server_requirements(images=True) == [execution_env.NUMPY, execution_env.PILLOW]
