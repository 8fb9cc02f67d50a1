"""A team's labelled images as train, calibration and test splits, preprocessed as the service will.

Sources: a class-per-folder directory (``ROOT/<class>/<image>.jpg|.jpeg|.png``; class names are the
folder names, sorted, as torchvision's ``ImageFolder`` orders them) or an ``.npz`` with ``images``
((N, H, W), (N, C, H, W) or (N, H, W, C); uint8, or floats in [0, 1]), ``labels`` ((N,) class indices;
left out, the images are unlabelled, which only attach-mode builds accept) and optionally
``class_names``. Every image goes through ``offramp.backend.image`` - the code the orchestrator runs
on ``IMAGE_BYTES`` - so training, calibration and served bytes see the same tensors.

The splits not given as sources are carved out of ``train``: per class (stratified), seeded, each
takes its fraction of the train source's images, rounded, and train keeps the rest; every split
needs at least one image of every class. Everything that can be wrong with the data is found here,
before any training, and raised as ``ImageDataError`` naming the path, class or file.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from offramp.backend.image import ImageError, ImageSpec, open_image, pixels_of

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
GRAYSCALE_MODES = ("1", "L", "LA")
UNLABELLED = -1
SPLITS = ("train", "calibration", "test")


class ImageDataError(ValueError):
    """Data a build cannot use; the message says which path, class or file, and what to do."""


@dataclass(frozen=True)
class ImageSet:
    images: np.ndarray  # (N, C, H, W) float32, preprocessed as ImageSplits.preprocess says
    labels: np.ndarray  # (N,) int64 class indices; UNLABELLED (-1) for unlabelled images

    @property
    def labelled(self) -> bool:
        return bool(len(self.labels)) and bool((self.labels != UNLABELLED).all())


@dataclass(frozen=True)
class ImageSplits:
    train: ImageSet
    calibration: ImageSet
    test: ImageSet
    class_names: tuple[str, ...]  # empty where unlabelled data named none
    preprocess: ImageSpec  # what made the tensors: the build records it, the orchestrator applies it
    # Where the images came from and how they were split: a build records it in its manifest
    # (``build["data"]``), from which ``offramp calibrate`` and ``offramp infer`` load the held-out
    # splits again (``offramp.build.calibrate.held_out_data``). Empty for splits made by hand.
    source: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _Source:
    """One source before decoding: its images (by position), their labels and its class names."""

    path: Path
    describe: Callable[[int], str]  # where image i comes from, for error messages
    header: Callable[[int], tuple[str, tuple[int, int]] | None]  # image i's mode and (width, height)
    load: Callable[[int], Image.Image]  # image i, decoded
    labels: np.ndarray  # (N,) int64 indices into class_names; UNLABELLED where unlabelled
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)


def load_image_splits(
    train: Path,
    calibration: Path | None,
    test: Path | None,
    fractions: tuple[float, float, float],
    seed: int,
    image_size: int | None,
    *,
    preprocess: ImageSpec | None = None,
) -> ImageSplits:
    """The three splits, decoded and preprocessed; ImageDataError for anything a build cannot use.

    ``fractions`` (train, calibration, test) size the splits carved out of ``train``. ``preprocess``
    None: grayscale if every training image is, else RGB; ``image_size`` (or the training images' own
    size) both as the shorter side and the centre crop; mean and std measured on the training split
    - right for a network trained on these splits, not for one trained elsewhere, which needs its own.
    """
    _check_fractions(fractions)
    if preprocess is not None and image_size is not None and image_size != preprocess.size:
        raise ImageDataError(
            f"image_size {image_size} contradicts the preprocessing's size {preprocess.size}"
        )
    sources = {"train": _open_source(train, "train")}
    for split, path in (("calibration", calibration), ("test", test)):
        if path is not None:
            sources[split] = _open_source(path, split)
    class_names = _unify_classes(sources)
    carved = [split for split in SPLITS if split not in sources]
    positions = _carve(sources["train"], class_names, fractions, seed, carved)
    spec = preprocess or _derived_spec(sources["train"], positions["train"], image_size)
    pixels, labels, failed = {}, {}, []
    for split in SPLITS:
        source = sources["train"] if split in positions else sources[split]
        chosen = positions[split] if split in positions else np.arange(len(source))
        pixels[split] = _decode(source, chosen, spec, failed)
        labels[split] = source.labels[chosen]
    if failed:  # every image that cannot be used is counted and the first few named, not just the first
        more = f" (and {len(failed) - 5} more)" if len(failed) > 5 else ""
        raise ImageDataError(f"{len(failed)} images cannot be used: " + "; ".join(failed[:5]) + more)
    if preprocess is None:
        spec = _with_measured_statistics(spec, pixels["train"])
    sets = {split: ImageSet(spec.normalize(pixels[split]), labels[split]) for split in SPLITS}
    source = {
        "kind": "images",
        **{
            split: str(Path(path).resolve()) if path else None
            for split, path in zip(SPLITS, (train, calibration, test))
        },
        "fractions": list(fractions),
        "seed": seed,
    }
    return ImageSplits(sets["train"], sets["calibration"], sets["test"], class_names, spec, source)


def _check_fractions(fractions: tuple[float, float, float]) -> None:
    if len(fractions) != 3 or min(fractions) < 0 or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise ImageDataError(
            "fractions (train, calibration, test) must be 3 non-negative numbers summing to 1, "
            f"not {fractions}"
        )


def _open_source(path: Path, split: str) -> _Source:
    path = Path(path)
    if not path.exists():
        raise ImageDataError(f"{split} data {path} not found")
    if path.is_dir():
        source = _image_folder(path, split)
    elif path.suffix == ".npz":
        source = _npz_images(path, split)
    else:
        raise ImageDataError(f"{split} data {path} is neither a folder of class folders nor an .npz file")
    if not len(source):
        raise ImageDataError(f"{split} data {path} holds no images")
    return source


def _image_folder(root: Path, split: str) -> _Source:
    loose = sorted(p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if loose:
        raise ImageDataError(
            f"{split} data {root} has images at its top ({', '.join(loose[:3])}): put each image in "
            "the folder of its class (ROOT/<class>/<image>)"
        )
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ImageDataError(f"{split} data {root} has no class folders (ROOT/<class>/<image>.png|.jpg)")
    files: list[Path] = []
    labels: list[int] = []
    for index, name in enumerate(classes):
        images = sorted(
            p
            for p in (root / name).iterdir()
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
        )
        if not images:
            raise ImageDataError(
                f"{split} data: class folder {root / name} holds no .jpg, .jpeg or .png image"
            )
        files += images
        labels += [index] * len(images)

    def header(i: int) -> tuple[str, tuple[int, int]] | None:
        try:
            with Image.open(files[i]) as image:
                return image.mode, image.size
        except Exception:  # reported, with its reason, when the images are decoded
            return None

    return _Source(
        root,
        lambda i: str(files[i]),
        header,
        lambda i: open_image(files[i].read_bytes()),
        np.array(labels, dtype=np.int64),
        tuple(classes),
    )


def _npz_images(path: Path, split: str) -> _Source:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except Exception as error:
        raise ImageDataError(f"{split} data {path} is not a readable .npz ({error})") from None
    if "images" not in arrays:
        raise ImageDataError(f"{split} data {path} has no 'images' array; it holds {sorted(arrays)}")
    images = _channels_last(arrays["images"], path)  # (N, H, W) or (N, H, W, 3) uint8
    rows = len(images)
    labels = arrays.get("labels")
    if labels is None:
        labels = np.full(rows, UNLABELLED, dtype=np.int64)
    elif labels.shape != (rows,) or labels.dtype.kind not in "iu" or (rows and labels.min() < 0):
        raise ImageDataError(
            f"{split} data {path}: 'labels' must be {rows} non-negative integers (N,), "
            f"not {labels.dtype} {labels.shape}"
        )
    class_names = tuple(str(n) for n in arrays.get("class_names", ()))
    if class_names and rows and labels.max() >= len(class_names):
        raise ImageDataError(
            f"{split} data {path}: label {labels.max()} but only {len(class_names)} class_names"
        )
    mode = "L" if images.ndim == 3 else "RGB"
    size = (images.shape[2], images.shape[1])  # Pillow's (width, height)
    return _Source(
        path,
        lambda i: f"{path} image {i}",
        lambda i: (mode, size),
        lambda i: Image.fromarray(images[i]),
        labels.astype(np.int64),
        class_names,
    )


def _channels_last(images: np.ndarray, path: Path) -> np.ndarray:
    """uint8 images as Pillow takes them, (N, H, W) or (N, H, W, 3); an array (N, C, H, W) is read as
    channels first when its axis 1 is 1 or 3."""
    if images.dtype.kind == "f":
        if images.size and (not np.isfinite(images).all() or images.min() < 0 or images.max() > 1):
            raise ImageDataError(f"{path}: float images must lie in [0, 1] (or be uint8 pixels)")
        images = np.rint(images * 255).astype(np.uint8)
    elif images.dtype != np.uint8:
        raise ImageDataError(f"{path}: images must be uint8 or floats in [0, 1], not {images.dtype}")
    if images.ndim == 4 and images.shape[1] in (1, 3):
        images = images.transpose(0, 2, 3, 1)
    if images.ndim == 4 and images.shape[3] in (1, 3):
        return np.ascontiguousarray(images[..., 0] if images.shape[3] == 1 else images)
    if images.ndim == 3:
        return images
    raise ImageDataError(
        f"{path}: images must be (N, H, W), (N, C, H, W) or (N, H, W, C) with C 1 or 3, not {images.shape}"
    )


def _is_labelled(source: _Source) -> bool:
    return bool((source.labels != UNLABELLED).any())


def _unify_classes(sources: dict[str, _Source]) -> tuple[str, ...]:
    """The training classes; calibration and test labels re-indexed onto them, by name. A labelled
    class that the labelled training data never shows is an error (where training data is unlabelled,
    the network's own head is the teacher and knows every class)."""
    train = sources["train"]
    names = train.class_names or _index_names(sources)
    seen = {names[i] for i in np.unique(train.labels)} if _is_labelled(train) else set(names)
    for split in ("calibration", "test"):
        source = sources.get(split)
        if source is None or not _is_labelled(source):
            continue
        # .npz labels without class names index the training classes
        own = source.class_names or (*names, *(str(i) for i in range(len(names), source.labels.max() + 1)))
        unseen = sorted({own[i] for i in np.unique(source.labels)} - seen)
        if unseen:
            raise ImageDataError(
                f"{split} data {source.path} has classes the training data never shows: {unseen}; "
                f"training classes: {sorted(seen)}"
            )
        remap = np.array([names.index(n) if n in names else UNLABELLED for n in own], dtype=np.int64)
        sources[split] = replace(source, labels=remap[source.labels], class_names=names)
    return names


def _index_names(sources: dict[str, _Source]) -> tuple[str, ...]:
    """Class names of .npz data that named none: the label indices themselves."""
    largest = [int(s.labels.max()) for s in sources.values() if _is_labelled(s)]
    return tuple(str(i) for i in range(max(largest) + 1)) if largest else ()


def _carve(
    source: _Source,
    class_names: tuple[str, ...],
    fractions: tuple[float, float, float],
    seed: int,
    carved: list[str],
) -> dict[str, np.ndarray]:
    """Positions in the train source of "train" and of each split carved out of it, per class, seeded."""
    shares = {split: fractions[SPLITS.index(split)] for split in carved}
    minimum = _minimum_per_group(shares)
    labelled = _is_labelled(source)
    groups = (
        [np.flatnonzero(source.labels == c) for c in range(len(class_names))]
        if labelled
        else [np.arange(len(source))]
    )
    rng = np.random.default_rng(seed)
    positions: dict[str, list[np.ndarray]] = {split: [] for split in ["train", *carved]}
    for index, group in enumerate(groups):
        if len(group) < minimum:
            what = f"class {class_names[index]!r} has" if labelled else "it has"
            need = ", ".join(f"{split} {share:g}" for split, share in shares.items())
            purpose = f"carving {need} out of it" if shares else "training"
            raise ImageDataError(
                f"train data {source.path}: {what} {len(group)} images; {purpose} needs at least {minimum} "
                "per class (one in every split)"
            )
        order = rng.permutation(group)
        start = 0
        for split, share in shares.items():
            count = _rounded(len(group) * share)
            positions[split].append(order[start : start + count])
            start += count
        positions["train"].append(order[start:])
    return {split: np.sort(np.concatenate(parts)) for split, parts in positions.items()}


def _rounded(value: float) -> int:
    return math.floor(value + 0.5)


def _minimum_per_group(shares: dict[str, float]) -> int:
    """The fewest images a class needs so that each carved share and training get at least one."""
    if any(share <= 0 for share in shares.values()) or sum(shares.values()) >= 1:
        raise ImageDataError(
            f"fractions {shares} leave a split without images: a split carved out of the training data needs "
            "a positive fraction, and training must keep some"
        )
    n = 1
    while (
        any(_rounded(n * s) < 1 for s in shares.values())
        or n - sum(_rounded(n * s) for s in shares.values()) < 1
    ):
        n += 1
    return n


def _derived_spec(source: _Source, positions: np.ndarray, image_size: int | None) -> ImageSpec:
    """Channels and size from the training images' headers; mean and std are measured later."""
    headers = {source.header(int(i)) for i in positions} - {None}
    if not headers:
        raise ImageDataError(
            f"train data {source.path}: none of its {len(positions)} training images is a readable JPEG or "
            f"PNG (the first: {source.describe(int(positions[0]))})"
        )
    modes, sizes = {mode for mode, _ in headers}, {size for _, size in headers}
    channels = 1 if modes <= set(GRAYSCALE_MODES) else 3
    if image_size is None:
        if len(sizes) != 1:
            examples = ", ".join(f"{w}x{h}" for w, h in sorted(sizes)[:3])
            raise ImageDataError(
                f"train data {source.path}: the images differ in size ({examples}): give image_size"
            )
        image_size = min(next(iter(sizes)))
    return ImageSpec(channels, image_size, mean=(0.0,) * channels, std=(1.0,) * channels)


def _with_measured_statistics(spec: ImageSpec, pixels: np.ndarray) -> ImageSpec:
    """The spec with the per-channel mean and std of the training pixels (in [0, 1]), to 4 decimals."""
    values = pixels.transpose(1, 0, 2, 3).reshape(spec.channels, -1).astype(np.float64) / 255.0  # (C, N*H*W)
    std = np.maximum(values.std(axis=1), 1e-3)  # a blank channel would divide by zero
    return replace(
        spec,
        mean=tuple(round(float(m), 4) for m in values.mean(axis=1)),
        std=tuple(round(float(s), 4) for s in std),
    )


def _decode(source: _Source, positions: np.ndarray, spec: ImageSpec, failed: list[str]) -> np.ndarray:
    """uint8 (N, C, H, W) of the source's images at ``positions``; each image that cannot be used is
    added to ``failed``, with its path and why."""
    pixels = np.zeros((len(positions), *spec.shape), dtype=np.uint8)
    for row, i in enumerate(positions):
        try:
            pixels[row] = pixels_of(source.load(int(i)), spec)
        except ImageError as error:
            failed.append(f"{source.describe(int(i))} {error}")
    return pixels
