"""A team's images as splits: folders and .npz files, stratified seeded carving, the preprocessing the
service applies, and a clear error for each way the data can be unusable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from offramp.backend.image import ImageDecoder, ImageSpec, encode_png
from offramp.build.image_data import UNLABELLED, ImageDataError, load_image_splits

CLASSES = ("ankle boot", "bag", "coat")
FRACTIONS = (0.7, 0.15, 0.15)


def pixels(rows: int, seed: int = 0, height: int = 10, width: int = 10, channels: int = 1) -> np.ndarray:
    """uint8 (rows, C, H, W)."""
    return np.random.default_rng(seed).integers(0, 256, (rows, channels, height, width)).astype(np.uint8)


def write_folder(root: Path, per_class: dict[str, int], seed: int = 0, **shape: int) -> Path:
    for index, (name, count) in enumerate(per_class.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for row, image in enumerate(pixels(count, seed + index, **shape)):
            (root / name / f"{row:03d}.png").write_bytes(encode_png(image))
    return root


@pytest.fixture
def folder(tmp_path):
    return write_folder(tmp_path / "train", {name: 20 for name in CLASSES})


def test_a_folder_is_split_per_class_and_preprocessed_as_the_service_will(folder):
    splits = load_image_splits(folder, None, None, FRACTIONS, seed=0, image_size=None)
    assert splits.class_names == CLASSES
    for part, per_class in ((splits.train, 14), (splits.calibration, 3), (splits.test, 3)):
        assert part.images.dtype == np.float32 and part.images.shape[1:] == (1, 10, 10)
        np.testing.assert_array_equal(np.bincount(part.labels), [per_class] * 3)
    spec = splits.preprocess
    assert (spec.channels, spec.size, spec.resize) == (1, 10, None)
    everything = np.concatenate([splits.train.images, splits.calibration.images, splits.test.images])
    np.testing.assert_allclose(everything.mean(), 0.0, atol=0.05)  # mean and std measured on train
    # The tensors are what the orchestrator makes of the files' bytes.
    files = sorted((folder / CLASSES[0]).iterdir())
    served = ImageDecoder(spec).decode(np.array([f.read_bytes() for f in files], dtype=np.object_))
    ours = np.concatenate([s.images[s.labels == 0] for s in (splits.train, splits.calibration, splits.test)])
    assert sorted(map(bytes, served)) == sorted(map(bytes, ours))


def test_the_splits_record_their_source(folder, tmp_path):
    test = tmp_path / "test.npz"
    np.savez(test, images=pixels(6, 9)[:, 0], labels=[0, 1, 2, 0, 1, 2])
    splits = load_image_splits(folder, None, test, (0.8, 0.2, 0.0), seed=3, image_size=None)
    assert splits.source == {
        "kind": "images", "train": str(folder.resolve()), "calibration": None, "test": str(test.resolve()),
        "fractions": [0.8, 0.2, 0.0], "seed": 3,
    }  # fmt: skip
    again = load_image_splits(folder, None, test, (0.8, 0.2, 0.0), seed=3, image_size=None)
    np.testing.assert_array_equal(again.calibration.images, splits.calibration.images)


def test_the_split_is_seeded(folder):
    first, again = (
        load_image_splits(folder, None, None, FRACTIONS, seed=0, image_size=None) for _ in range(2)
    )
    other = load_image_splits(folder, None, None, FRACTIONS, seed=1, image_size=None)
    np.testing.assert_array_equal(first.test.images, again.test.images)
    assert not np.array_equal(first.test.images, other.test.images)


def test_an_image_size_resizes_and_colour_makes_three_channels(tmp_path):
    root = write_folder(tmp_path / "colour", {"a": 8, "b": 8}, channels=3, height=12, width=16)
    splits = load_image_splits(root, None, None, (0.5, 0.25, 0.25), seed=0, image_size=6)
    assert splits.train.images.shape[1:] == (3, 6, 6) and splits.preprocess.channels == 3


def test_given_calibration_and_test_keep_their_images_and_map_classes_by_name(folder, tmp_path):
    calibration = write_folder(tmp_path / "cal", {"coat": 2, "bag": 1}, seed=7)
    test = tmp_path / "test.npz"
    np.savez(test, images=pixels(4, 9)[:, 0], labels=[0, 0, 1, 1], class_names=["coat", "ankle boot"])
    splits = load_image_splits(folder, calibration, test, FRACTIONS, seed=0, image_size=None)
    assert len(splits.train.labels) == 60  # nothing carved out of train
    np.testing.assert_array_equal(splits.calibration.labels, [1, 2, 2])  # bag, coat, coat
    np.testing.assert_array_equal(splits.test.labels, [2, 2, 0, 0])


@pytest.mark.parametrize(
    "images",
    [
        pixels(30)[:, 0],  # (N, H, W)
        pixels(30),  # (N, 1, H, W)
        pixels(30).transpose(0, 2, 3, 1),  # (N, H, W, 1)
        pixels(30).astype(np.float32) / 255.0,  # floats in [0, 1]
    ],
)
def test_npz_layouts_give_the_same_tensors(tmp_path, images):
    path = tmp_path / "data.npz"
    np.savez(path, images=images, labels=np.arange(30) % 3)
    splits = load_image_splits(path, None, None, FRACTIONS, seed=0, image_size=None)
    reference = tmp_path / "reference.npz"
    np.savez(reference, images=pixels(30)[:, 0], labels=np.arange(30) % 3)
    expected = load_image_splits(reference, None, None, FRACTIONS, seed=0, image_size=None)
    assert splits.class_names == ("0", "1", "2")
    np.testing.assert_array_equal(splits.train.images, expected.train.images)


def test_unlabelled_images_are_split_without_classes(tmp_path):
    path = tmp_path / "unlabelled.npz"
    np.savez(path, images=pixels(20)[:, 0])
    splits = load_image_splits(path, None, None, (0.6, 0.2, 0.2), seed=0, image_size=None)
    assert splits.class_names == () and not splits.train.labelled
    assert [len(s.labels) for s in (splits.train, splits.calibration, splits.test)] == [12, 4, 4]
    assert (splits.train.labels == UNLABELLED).all()


def test_a_given_preprocessing_is_applied(folder):
    spec = ImageSpec(channels=3, size=8, resize=9, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    splits = load_image_splits(folder, None, None, FRACTIONS, seed=0, image_size=None, preprocess=spec)
    assert splits.preprocess == spec and splits.train.images.shape[1:] == (3, 8, 8)
    assert -1.0 <= splits.train.images.min() and splits.train.images.max() <= 1.0
    with pytest.raises(ImageDataError, match="image_size 9 contradicts the preprocessing's size 8"):
        load_image_splits(folder, None, None, FRACTIONS, seed=0, image_size=9, preprocess=spec)


# ---------------------------------------------------------------------------------------------
# Errors, each before any training


def error_of(*args, **kwargs) -> str:
    with pytest.raises(ImageDataError) as caught:
        load_image_splits(*args, **kwargs)
    return str(caught.value)


def test_missing_paths_and_unknown_kinds(tmp_path, folder):
    assert "train data" in error_of(tmp_path / "nowhere", None, None, FRACTIONS, 0, None)
    assert "not found" in error_of(tmp_path / "nowhere", None, None, FRACTIONS, 0, None)
    message = error_of(folder, tmp_path / "missing_cal", None, FRACTIONS, 0, None)
    assert "calibration data" in message and "missing_cal not found" in message
    (tmp_path / "labels.csv").write_text("a,b\n")
    assert "neither a folder of class folders nor an .npz" in error_of(
        tmp_path / "labels.csv", None, None, FRACTIONS, 0, None
    )


def test_folder_layout_errors(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "cat.png").write_bytes(encode_png(pixels(1)[0]))
    assert "put each image in the folder of its class" in error_of(flat, None, None, FRACTIONS, 0, None)
    empty_class = write_folder(tmp_path / "empty", {"a": 10})
    (empty_class / "b").mkdir()
    assert f"class folder {empty_class / 'b'} holds no .jpg" in error_of(
        empty_class, None, None, FRACTIONS, 0, None
    )
    (tmp_path / "none").mkdir()
    assert "has no class folders" in error_of(tmp_path / "none", None, None, FRACTIONS, 0, None)


def test_too_few_images_per_class_states_the_minimum(tmp_path):
    root = write_folder(tmp_path / "small", {"a": 20, "b": 3})
    message = error_of(root, None, None, FRACTIONS, 0, None)
    assert "class 'b' has 3 images" in message and "at least 4 per class" in message
    # With calibration and test given, training needs one per class.
    write_folder(tmp_path / "cal", {"a": 1, "b": 1})
    splits = load_image_splits(root, tmp_path / "cal", tmp_path / "cal", FRACTIONS, 0, None)
    assert len(splits.train.labels) == 23


def test_a_class_training_never_saw(tmp_path, folder):
    calibration = write_folder(tmp_path / "cal", {"bag": 2, "sandal": 2})
    message = error_of(folder, calibration, None, FRACTIONS, 0, None)
    assert "calibration data" in message and "never shows: ['sandal']" in message
    test = tmp_path / "test.npz"
    np.savez(test, images=pixels(2)[:, 0], labels=[0, 5])
    assert "test data" in error_of(folder, None, test, FRACTIONS, 0, None)


def test_every_undecodable_image_is_named(folder):
    (folder / "bag" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    (folder / "coat" / "notes.jpg").write_text("hello")
    message = error_of(folder, None, None, FRACTIONS, 0, None)
    assert message.startswith("2 images cannot be used")
    assert str(folder / "bag" / "broken.png") in message and str(folder / "coat" / "notes.jpg") in message


def test_training_data_without_one_readable_image(tmp_path):
    root = tmp_path / "broken"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for row in range(10):
            (root / name / f"{row}.png").write_bytes(b"not a png")
    message = error_of(root, None, None, FRACTIONS, 0, None)
    assert "none of its 12 training images is a readable JPEG or PNG" in message
    assert str(root / "a") in message


def test_images_of_several_sizes_need_an_image_size(tmp_path):
    root = write_folder(tmp_path / "mixed", {"a": 10})
    write_folder(root, {"b": 10}, height=12, width=14)
    assert "differ in size (10x10, 14x12): give image_size" in error_of(root, None, None, FRACTIONS, 0, None)
    assert load_image_splits(root, None, None, FRACTIONS, 0, image_size=10).train.images.shape[1:] == (
        1,
        10,
        10,
    )


@pytest.mark.parametrize(
    "arrays,message",
    [
        (dict(labels=np.zeros(3)), "has no 'images' array"),
        (dict(images=pixels(3)[:, 0], labels=[0, 1]), "'labels' must be 3 non-negative integers"),
        (dict(images=pixels(3)[:, 0], labels=[0, -1, 1]), "non-negative"),
        (dict(images=pixels(3)[:, 0] * 2.0, labels=[0, 1, 1]), "float images must lie in [0, 1]"),
        (dict(images=pixels(3)[:, 0].astype(np.int32), labels=[0, 1, 1]), "uint8 or floats"),
        (dict(images=pixels(3, channels=2), labels=[0, 1, 1]), "with C 1 or 3"),
        (dict(images=pixels(3)[:, 0], labels=[0, 1, 2], class_names=["a", "b"]), "only 2 class_names"),
        (dict(images=pixels(0)[:, 0], labels=np.zeros(0, np.int64)), "holds no images"),
    ],
)
def test_npz_errors(tmp_path, arrays, message):
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    assert message in error_of(path, None, None, FRACTIONS, 0, None)


@pytest.mark.parametrize("fractions", [(0.5, 0.5, 0.5), (0.8, 0.3, -0.1), (1.0, 0.0, 0.0)])
def test_fractions_that_leave_no_data(folder, fractions):
    assert "fraction" in error_of(folder, None, None, fractions, 0, None)
