"""A team's ResNet built in attach mode and served by a real tritonserver: ``<name>_full`` answers the
original network's logits, the early-exit service the in-process cascade, and PNG bytes decoded in the
orchestrator the same as their preprocessed tensors; a bad image fails its own request only."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from offramp.backend.image import IMAGE_BYTES_INPUT, IMAGE_INPUT, ImageSpec, encode_png
from offramp.build.image_data import load_image_splits
from offramp.build.repository import RepositoryOptions, full_model_name, write_repository
from offramp.build.resnet import resnet
from offramp.build.train import TrainConfig
from offramp.build.vision import build_vision_classifier
from offramp.client.grpc_client import OfframpClient
from tests.served_reference import Reference, spread_policy
from tests.torchvision_reference import seeded_state_dict

pytestmark = pytest.mark.integration
# RGB from grayscale PNGs, the shorter side 28 -> 26, a 24x24 centre crop: every preprocessing step runs.
SPEC = ImageSpec(channels=3, size=24, resize=26, mean=(0.3, 0.3, 0.3), std=(0.35, 0.35, 0.35))


def write_folder(root, images, labels):
    for row, (image, label) in enumerate(zip(images, labels)):
        (root / f"class_{label}").mkdir(parents=True, exist_ok=True)
        (root / f"class_{label}" / f"{row:04d}.png").write_bytes(
            encode_png(np.rint(image * 255).astype(np.uint8))
        )
    return root


@pytest.fixture(scope="module")
def served_resnet(fashion_test, tmp_path_factory, running_server, execution_env):
    images, labels = fashion_test
    data = tmp_path_factory.mktemp("team_data")
    train = write_folder(data / "train", images[:400], labels[:400])
    test = write_folder(data / "test", images[400:528], labels[400:528])
    splits = load_image_splits(train, None, test, (0.75, 0.25, 0.0), 0, None, preprocess=SPEC)
    team = resnet("resnet18", num_classes=10, width=8)  # the team's own weights: 3 channels, 10 classes
    team.load_state_dict(seeded_state_dict(team, seed=5))
    torch.save(team.state_dict(), data / "team.pt")
    directory = tmp_path_factory.mktemp("build")
    artifacts = build_vision_classifier(
        directory,
        name="team_resnet",
        architecture="resnet18",
        weights=data / "team.pt",
        splits=splits,
        exits=None,
        mode="attach",
        train=TrainConfig(epochs=2, batch_size=64),
        preprocess=SPEC,
        progress=False,
    )
    policy = spread_policy(artifacts, directory, {IMAGE_INPUT: splits.test.images})
    repository = tmp_path_factory.mktemp("repo")
    write_repository(artifacts, directory, policy, repository, RepositoryOptions(execution_env=execution_env))
    png = np.array(
        [p.read_bytes() for p in sorted(test.glob("*/*.png"))], dtype=np.object_
    )  # the split's order
    with running_server(repository) as server:
        yield server, artifacts, Reference(artifacts, directory, policy), splits.test.images, png, team.eval()


def assert_same_answers(served, expected, rows=slice(None)):
    np.testing.assert_array_equal(served.exit, expected.exit[rows])
    np.testing.assert_array_equal(served.label, expected.label[rows])
    np.testing.assert_allclose(served.logits, expected.logits[rows], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(served.cost, expected.cost[rows])


def test_full_model_answers_the_original_networks_logits(served_resnet):
    server, artifacts, _, images, _, team = served_resnet
    with torch.no_grad():
        original = team(torch.from_numpy(images)).numpy()
    with OfframpClient(server.grpc_url) as client:
        full = client.full_logits(full_model_name(artifacts.name), images)
        forced = client.classify(artifacts.name, images, force_full=True)
    np.testing.assert_allclose(full, original, rtol=0, atol=1e-5 * np.abs(original).max())
    np.testing.assert_array_equal(forced.label, original.argmax(1))


def test_served_answers_equal_the_in_process_cascade(served_resnet):
    server, artifacts, reference, images, _, _ = served_resnet
    expected = reference({IMAGE_INPUT: images})
    assert len(set(expected.exit.tolist())) == artifacts.num_exits, "the policy should use every exit"
    with OfframpClient(server.grpc_url) as client:
        assert_same_answers(client.classify(artifacts.name, images), expected)


def test_png_bytes_are_answered_as_their_tensors(served_resnet):
    server, artifacts, reference, images, png, _ = served_resnet
    expected = reference({IMAGE_INPUT: images})

    def part(start):
        with OfframpClient(server.grpc_url) as client:
            return start, client.classify(
                artifacts.name, {IMAGE_BYTES_INPUT: png[start : start + 8].reshape(-1, 1)}
            )

    with ThreadPoolExecutor(4) as pool:  # merged by the orchestrators' batchers, answered apart
        for start, served in pool.map(part, range(0, len(png), 8)):
            assert_same_answers(served, expected, slice(start, start + 8))


def _jpeg(png: bytes) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(png)).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _sixteen_bit_png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8), 4000, np.uint16)).save(buffer, format="PNG")
    return buffer.getvalue()


def _raw_bytes_infer(url, model, rows):
    with grpcclient.InferenceServerClient(url) as client:
        tensor = grpcclient.InferInput(IMAGE_BYTES_INPUT, [len(rows), 1], "BYTES")
        tensor.set_data_from_numpy(np.array(rows, dtype=np.object_).reshape(-1, 1))
        return client.infer(model, [tensor])


@pytest.mark.parametrize(
    "bad_row,message",
    [
        (b"\x89PNG\r\n\x1a\n not a png", r"IMAGE_BYTES row 1 is not a (readable )?JPEG or PNG image"),
        (_sixteen_bit_png(), r"IMAGE_BYTES row 1 has mode 'I;16' \(not 8-bit pixels\)"),  # a wrong mode
    ],
)
def test_a_bad_image_fails_its_own_request_only(served_resnet, bad_row, message):
    server, artifacts, reference, images, png, _ = served_resnet
    expected = reference({IMAGE_INPUT: images})

    def good(start):
        with OfframpClient(server.grpc_url) as client:
            rows = png[start : start + 16].reshape(-1, 1)
            return start, client.classify(artifacts.name, {IMAGE_BYTES_INPUT: rows})

    with ThreadPoolExecutor(6) as pool:
        goods = [pool.submit(good, start) for start in range(0, len(png), 16)]
        bads = [
            pool.submit(_raw_bytes_infer, server.grpc_url, artifacts.name, [png[0], bad_row])
            for _ in range(3)
        ]
        for future in bads:
            with pytest.raises(InferenceServerException, match=message) as caught:
                future.result()
            assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
        for future in goods:
            start, served = future.result()
            assert_same_answers(served, expected, slice(start, start + 16))
    # A JPEG of the same picture is served too (JPEG is lossy: its answer is its own).
    answer = _raw_bytes_infer(server.grpc_url, artifacts.name, [_jpeg(png[0])])
    assert answer.as_numpy("LOGITS").shape == (1, 10)
