"""Images in the orchestrator and in the build: JPEG/PNG bytes to the tensor the network takes.

One preprocessing, written down in the build's manifest as an ``ImageSpec`` and run by the same code
on both sides, so that a client sending encoded bytes (``IMAGE_BYTES``) gets the answers of the
tensors the network was trained and calibrated on. It is torchvision's PIL pipeline for
classification: ``convert`` to the channels, ``Resize(resize)`` (shorter side, bilinear, Pillow's
antialiasing), ``CenterCrop(size)``, ``ToTensor`` (pixels / 255), ``Normalize(mean, std)``; EXIF
orientation is not applied, as torchvision does not. NumPy and Pillow only: the orchestrator's stub
has no torch. Pillow is imported where an image is decoded, so that the orchestrator of a text or
tensor model runs in an environment without it.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

IMAGE_INPUT = "IMAGE"  # the network's own input: preprocessed (B, C, H, W) float32
IMAGE_BYTES_INPUT = "IMAGE_BYTES"  # encoded JPEG or PNG, one per row, decoded by the orchestrator
FORMATS = ("JPEG", "PNG")
# The modes JPEG and PNG decode to whose pixels are 8-bit: they convert to grayscale or RGB as the network
# expects (alpha dropped). A 16-bit PNG ("I;16") would be clipped at 255 by Pillow's convert, not
# scaled: refused instead.
EIGHT_BIT_MODES = frozenset({"1", "L", "LA", "P", "RGB", "RGBA", "CMYK"})
CHANNEL_MODES = {1: "L", 3: "RGB"}
# A few bytes of a crafted PNG can declare billions of pixels; the header is checked before decoding.
MAX_PIXELS = 1 << 25


class ImageError(ValueError):
    """An image that cannot be served or trained on; the message names the row or the file."""


@dataclass(frozen=True)
class ImageSpec:
    """How an image becomes the network's input tensor (``channels``, ``size``, ``size``)."""

    channels: int  # 1: grayscale (Pillow mode "L"), 3: RGB
    size: int  # the centre crop: the network sees size x size pixels
    resize: int | None = None  # the shorter side is scaled to this before the crop; None: to ``size``
    mean: tuple[float, ...] = (0.0,)  # per channel, of pixels in [0, 1]
    std: tuple[float, ...] = (1.0,)

    def __post_init__(self) -> None:
        if self.channels not in CHANNEL_MODES:
            raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), not {self.channels}")
        if self.size < 1 or (self.resize is not None and self.resize < self.size):
            raise ValueError(f"resize ({self.resize}) must be at least size ({self.size}), and size positive")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(
                f"mean {self.mean} and std {self.std} need one value per channel ({self.channels})"
            )
        if min(self.std) <= 0:
            raise ValueError(f"std must be positive, not {self.std}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.size, self.size)  # (C, H, W)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImageSpec:
        resize = data.get("resize")
        return cls(
            int(data["channels"]),
            int(data["size"]),
            None if resize is None else int(resize),
            tuple(float(m) for m in data["mean"]),
            tuple(float(s) for s in data["std"]),
        )

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 pixels (..., C, H, W) to the network's float32 input: (pixels / 255 - mean) / std."""
        mean = np.asarray(self.mean, dtype=np.float32)[:, None, None]
        std = np.asarray(self.std, dtype=np.float32)[:, None, None]
        return ((pixels.astype(np.float32) / np.float32(255.0)) - mean) / std


def open_image(data: bytes) -> Image.Image:
    """Decoded JPEG or PNG bytes; raises ImageError saying why not."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise ImageError("is not a JPEG or PNG image") from None
    except Exception as error:  # a recognised header that is broken: OSError, SyntaxError, ...
        raise ImageError(f"is not a readable JPEG or PNG image ({_reason(error)})") from None
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise ImageError(f"is {width}x{height} pixels; at most {MAX_PIXELS} are decoded")
    if image.mode not in EIGHT_BIT_MODES:
        raise ImageError(f"has mode {image.mode!r} (not 8-bit pixels); send 8-bit grayscale or colour")
    try:
        image.load()
    except Exception as error:  # truncated or corrupt pixel data
        raise ImageError(f"does not decode ({_reason(error)})") from None
    return image


def pixels_of(image: Image.Image, spec: ImageSpec) -> np.ndarray:
    """The spec's channels, resize and centre crop, as uint8 (C, H, W), before normalizing."""
    from PIL import Image

    image = image.convert(CHANNEL_MODES[spec.channels])
    width, height = image.size
    shorter = spec.resize or spec.size
    # torchvision's Resize(int): the shorter side becomes `shorter`, the longer one keeps the aspect
    # ratio, truncated to an integer.
    if width <= height:
        target = (shorter, int(shorter * height / width))
    else:
        target = (int(shorter * width / height), shorter)
    if target != image.size:
        image = image.resize(target, Image.Resampling.BILINEAR)
    # torchvision's CenterCrop: the offset rounds half to even.
    left = round((target[0] - spec.size) / 2.0)
    top = round((target[1] - spec.size) / 2.0)
    image = image.crop((left, top, left + spec.size, top + spec.size))
    pixels = np.asarray(image, dtype=np.uint8)  # (H, W) or (H, W, 3)
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


class ImageDecoder:
    """Encoded rows of a request to the network's input tensor."""

    def __init__(self, spec: ImageSpec) -> None:
        import PIL.Image  # noqa: F401  (where Pillow is missing, the model fails to load, not a request)

        self.spec = spec

    def decode(self, rows: np.ndarray) -> np.ndarray:
        """float32 (n, C, H, W) from ``rows`` (n,) or (n, 1) of JPEG/PNG bytes; ImageError names the row."""
        pixels = np.empty((rows.size, *self.spec.shape), dtype=np.uint8)
        for index, value in enumerate(rows.reshape(-1).tolist()):
            if not isinstance(value, bytes):
                raise ImageError(f"{IMAGE_BYTES_INPUT} row {index} must be bytes, not {type(value).__name__}")
            try:
                pixels[index] = pixels_of(open_image(value), self.spec)
            except ImageError as error:
                raise ImageError(f"{IMAGE_BYTES_INPUT} row {index} {error}") from None
        return self.spec.normalize(pixels)


def encode_png(pixels: np.ndarray) -> bytes:
    """uint8 (H, W) or (C, H, W) with C 1 or 3 as PNG bytes (what a client or a data folder holds)."""
    from PIL import Image

    array = pixels[0] if pixels.ndim == 3 and pixels.shape[0] == 1 else pixels
    if array.ndim == 3:
        array = array.transpose(1, 2, 0)  # (H, W, 3)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG")
    return buffer.getvalue()


def _reason(error: Exception) -> str:
    return str(error) or type(error).__name__
