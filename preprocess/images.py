"""Image preparation: decode, orient, RGB, resize the short side and center-crop (torchtitan's
rule), optionally into the nearest aspect-ratio bucket.

Workers return uint8 [3, H, W] tensors: a quarter of the bytes of float pixels through the
DataLoader's shared memory and the host-to-device copy; `to_model_range` maps them to
[-1, 1] on the device.
"""
from __future__ import annotations

import io
import math
import struct
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from shared.images import to_rgb  # noqa: F401 - one home for RGB conversion (encode and flux-sample)

from .sources import SKIP_BAD_IMAGE, SKIP_BOMB, SKIP_EMPTY_FILE, SKIP_TOO_SMALL

# Sides are multiples of 16: the VAE divides by 8 and the transformer packs 2x2 latent patches.
SIDE_MULTIPLE = 16
# Buckets span aspect ratios from 1:MAX_ASPECT to MAX_ASPECT:1.
MAX_ASPECT = 4.0
# A bucket's area stays within this fraction of the target's.
AREA_TOLERANCE = 0.15
# A truncated JPEG must be refused, not decoded half grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# --min-size's default: an image whose short side is under resolution // MIN_SIZE_AUTO_DIVISOR would be
# upscaled more than that many times to a square crop (an 8x8 icon blown up to 256px is noise to learn).
MIN_SIZE_AUTO = "auto"
MIN_SIZE_AUTO_DIVISOR = 2


@dataclass(frozen=True)
class Prepared:
    pixels: torch.Tensor   # uint8 [3, H, W]
    width: int             # the source image's size, after EXIF orientation
    height: int
    mask: torch.Tensor | None = None   # uint8 [H, W], with encode --masks (masks.py)


class ImageSkip(Exception):
    """An image that cannot be used; `reason` is the manifest's skip reason."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def parse_min_size(text: str | int | None) -> int | None:
    """--min-size's value: None for auto (see default_min_size), else the pixels (0: keep every image)."""
    if text is None or str(text).strip().lower() == MIN_SIZE_AUTO:
        return None
    try:
        pixels = int(str(text).strip())
    except ValueError:
        pixels = -1
    if pixels < 0:
        raise ValueError(f"--min-size must be {MIN_SIZE_AUTO} or a whole number of pixels >= 0 (0 keeps every "
                         f"image), not {text!r}")
    return pixels


def default_min_size(resolution: int) -> int:
    """--min-size auto: the smallest short side kept at this --resolution."""
    return resolution // MIN_SIZE_AUTO_DIVISOR


def check_min_size(width: int, height: int, min_size: int) -> None:
    """The one rule of --min-size, for encode and plan alike: raise ImageSkip(too_small) when the short
    side (as the image is seen, after EXIF orientation) is under `min_size`."""
    if min(width, height) < min_size:
        raise ImageSkip(SKIP_TOO_SMALL, f"{width}x{height} < {min_size}")


def make_buckets(resolution: int, multiple: int = SIDE_MULTIPLE, max_aspect: float = MAX_ASPECT) -> list[tuple]:
    """(width, height) buckets of about resolution**2 pixels, sides multiples of `multiple`."""
    area = resolution * resolution
    buckets = set()
    h = multiple
    while h <= resolution * max_aspect:
        w = max(multiple, round(area / h / multiple) * multiple)
        if 1 / max_aspect <= w / h <= max_aspect and abs(w * h / area - 1) <= AREA_TOLERANCE:
            buckets.update({(w, h), (h, w)})   # landscape and portrait alike
        h += multiple
    return sorted(buckets, key=lambda b: b[0] / b[1])


def nearest_bucket(width: int, height: int, buckets: list[tuple]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest the image's (in log ratio, so 2:1 and 1:2 are alike)."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def target_size(width: int, height: int, resolution: int, buckets: list[tuple] | None) -> tuple[int, int]:
    return nearest_bucket(width, height, buckets) if buckets else (resolution, resolution)


def open_image(data: bytes) -> Image.Image:
    """PIL image from bytes; raises ImageSkip for empty, corrupt and decompression-bomb files."""
    if not data:
        raise ImageSkip(SKIP_EMPTY_FILE)
    try:
        img = Image.open(io.BytesIO(data))   # reads the header only; PIL's bomb check happens here
    except Image.DecompressionBombError as e:
        raise ImageSkip(SKIP_BOMB, str(e)) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ImageSkip(SKIP_BAD_IMAGE, str(e)) from None
    return img


def resize_center_crop(img: Image.Image, width: int, height: int) -> Image.Image:
    """Scale so the image covers width x height (the short side lands on the target, the other
    rounded up as torchtitan does), then crop the center."""
    w, h = img.size
    scale = max(width / w, height / h)
    new_w, new_h = max(width, math.ceil(w * scale - 1e-6)), max(height, math.ceil(h * scale - 1e-6))
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.BICUBIC)
    left, top = (new_w - width) // 2, (new_h - height) // 2
    return img.crop((left, top, left + width, top + height))


def oriented_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) as the image is seen, after its EXIF orientation (from the header alone)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # EXIF oddities and the like are not our business
        orientation = img.getexif().get(0x0112, 1) if hasattr(img, "getexif") else 1
    w, h = img.size
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def prepare_image(data: bytes, resolution: int, *, buckets: list[tuple] | None = None, min_size: int = 0,
                  jpeg_draft: bool = True) -> Prepared:
    """Bytes -> Prepared (uint8 pixels at the target size, the source size); raises ImageSkip."""
    img = open_image(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # EXIF oddities and the like are not our business
            w, h = oriented_size(img)
            check_min_size(w, h, min_size)
            tw, th = target_size(w, h, resolution, buckets)
            if jpeg_draft and img.format == "JPEG":
                # Let libjpeg decode at 1/2, 1/4 or 1/8 scale while both sides stay at least the
                # target's longer side: several times faster on CC12M-sized photos.
                need = max(tw, th)
                img.draft("RGB", (need, need))
            img.load()
            img = ImageOps.exif_transpose(img)
            img = to_rgb(img)
            img = resize_center_crop(img, tw, th)
    except ImageSkip:
        raise
    except Image.DecompressionBombError as e:
        raise ImageSkip(SKIP_BOMB, str(e)) from None
    except (OSError, ValueError, SyntaxError, struct.error, EOFError, IndexError, KeyError) as e:
        raise ImageSkip(SKIP_BAD_IMAGE, str(e)) from None
    arr = np.asarray(img, dtype=np.uint8)
    return Prepared(pixels=torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous(), width=w, height=h)


def to_model_range(pixels: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """uint8 pixels -> [-1, 1] in `dtype` (the VAE's input range)."""
    return pixels.to(dtype).div_(127.5).sub_(1.0)
