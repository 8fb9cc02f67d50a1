"""Fashion-MNIST from its IDX files (Debian package ``dataset-fashion-mnist`` or any folder)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CNN = "fashion_cnn"  # the recipe's model name
CLASS_NAMES = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)  # fmt: skip
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _read_idx(path: Path) -> np.ndarray:
    """An IDX array (the format of the MNIST family), gzipped or not."""
    candidates = [path.with_name(path.name + ".gz"), path]
    found = next((p for p in candidates if p.exists()), None)
    if found is None:
        raise FileNotFoundError(
            f"{path}(.gz) not found; install the Debian package dataset-fashion-mnist "
            "or pass the folder that holds the IDX files"
        )
    opener = gzip.open if found.suffix == ".gz" else open
    with opener(found, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{found} is not an unsigned-byte IDX file")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(split: str, directory: Path | str = DEFAULT_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Images as float32 (N, 1, 28, 28) in [0, 1] and labels as int64 (N,) for ``split`` train/test."""
    if split not in _FILES:
        raise ValueError(f"split must be one of {sorted(_FILES)}, not {split!r}")
    image_file, label_file = _FILES[split]
    images = _read_idx(Path(directory) / image_file)  # (N, 28, 28) uint8
    labels = _read_idx(Path(directory) / label_file)  # (N,) uint8
    if len(images) != len(labels):
        raise ValueError(f"{split}: {len(images)} images but {len(labels)} labels")
    return (images[:, None].astype(np.float32) / 255.0), labels.astype(np.int64)
