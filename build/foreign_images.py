"""Images of other domains for a Fashion-MNIST model, from data shipped inside installed packages (nothing
downloads), brought to Fashion-MNIST's form (float32 (N, 1, 28, 28) in [0, 1], bright item on black):

- scikit-learn's handwritten digits (UCI optical digits, 1,797 images of 8x8 at 17 grey levels);
- crops of a photograph, matplotlib's sample ``grace_hopper.jpg`` (a portrait in uniform), as negatives:
  real image content at random places and scales, inverted to the MNIST family's bright-on-dark;
- Fashion-MNIST's own images with their pixels shuffled (one fixed permutation): the same brightness
  histogram, no shape. (The demo CNN answers these at its first exit more often than it answers
  clothes, on a confident-looking softmax: the hard case for a novelty gate.)

A model of clothes has seen neither: every answer it gives them is wrong by construction. Whether its
early exits also disagree with its full depth there (what shadow checks can see without labels) depends
on the model and the domain; benchmarks/live_guarantee.md measures both.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def load_digits_as_fashion(mirrored: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Digits as float32 (N, 1, 28, 28) in [0, 1] (white strokes on black, as Fashion-MNIST's items) and
    their digit labels int64 (N,); with ``mirrored`` each image's left-right mirror follows the 1,797
    originals (3,594 images, each real, none repeated)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError("the digits come with scikit-learn: pip install scikit-learn") from error
    from PIL import Image

    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0  # (N, 8, 8) in [0, 1]
    labels = digits.target.astype(np.int64)
    if mirrored:
        images = np.concatenate([images, images[:, :, ::-1]])
        labels = np.concatenate([labels, labels])
    # Bilinear upscaling to 24x24 inside a 2-pixel black border, as the MNIST family frames its items.
    scaled = np.stack([np.asarray(Image.fromarray(i).resize((24, 24), Image.BILINEAR)) for i in images])
    framed = np.zeros((len(images), 1, 28, 28), dtype=np.float32)
    framed[:, 0, 2:26, 2:26] = np.clip(scaled, 0.0, 1.0)
    return framed, labels


def load_photo_crops_as_fashion(rows: int, seed: int = 0, negative: bool = True) -> np.ndarray:
    """``rows`` square crops (side 28 px to half the photograph's shorter side, at random places) of
    matplotlib's sample photograph, in greyscale, resized to 28x28, as negatives unless ``negative`` is
    False: float32 (rows, 1, 28, 28) in [0, 1]."""
    import matplotlib
    from PIL import Image

    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    photo = np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255.0  # (H, W)
    rng = np.random.default_rng(seed)
    crops = np.empty((rows, 1, 28, 28), dtype=np.float32)
    for i in range(rows):
        side = int(rng.integers(28, min(photo.shape) // 2))
        top, left = (int(rng.integers(0, extent - side)) for extent in photo.shape)
        crop = Image.fromarray(photo[top : top + side, left : left + side]).resize((28, 28), Image.BILINEAR)
        crops[i, 0] = np.asarray(crop)
    return 1.0 - crops if negative else crops


def shuffle_pixels(images: np.ndarray, seed: int = 0) -> np.ndarray:
    """``images`` (N, 1, H, W) with their pixels moved by one random permutation, the same for every
    image: float32, same shape, same values per image."""
    flat = images.reshape(len(images), -1)
    order = np.random.default_rng(seed).permutation(flat.shape[1])
    return np.ascontiguousarray(flat[:, order].reshape(images.shape), dtype=np.float32)
