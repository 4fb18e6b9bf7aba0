"""Loss masks (`flux-prep encode --masks`): a mask per image, cropped as its image, stored at latent resolution.

Where a mask comes from, first found: a mask file (`KEY.mask.png` beside the image in a tar; `masks/STEM.png`
beside the images of a folder; any image format), else the image's alpha channel, else none (the whole image
counts: a full mask). White / opaque counts, black / transparent is left out of the loss. A mask file must have
its image's size (both as seen, after EXIF orientation); one that cannot be decoded or has another size skips
its sample (counted: bad_mask, mask_size_mismatch), since training it unmasked would learn what the user masked.

The mask goes through the image's own resize and center crop (images.resize_center_crop) and is then averaged
over each latent cell's pixels (latent_mask): each latent value is computed from a neighbourhood of the VAE's
8x8 pixel block, so the fraction of that block inside the mask is the weight its error should get; nearest
sampling would drop or keep thin strokes by where they fall, a max would grow the mask by up to 7 pixels.
"""
from __future__ import annotations

import io
import warnings
from glob import escape as glob_escape
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from .images import ImageSkip, resize_center_crop
from .sources import IMAGE_EXTS

SKIP_BAD_MASK = "bad_mask"                  # a mask file that cannot be decoded
SKIP_MASK_SIZE = "mask_size_mismatch"       # a mask file of another size than its image
MASK_DTYPE = "float16"                      # the cache's mask column: fractions in [0, 1], 1 = in the loss
MASK_RULE = ("KEY.mask.* (tar) or masks/STEM.* (folder), else alpha; cropped as the image, area-averaged to the "
             "latent grid")
FULL = 255


def mask_file(files: dict) -> bytes | None:
    """The sample's mask file's bytes (`mask.png`, `mask.jpg`, ... among its files), or None."""
    found = sorted(ext for ext in files if ext.startswith("mask."))
    return files[found[0]] if found else None


def add_folder_mask(files: dict, stem: Path) -> None:
    """A folder sample's `masks/STEM.*` as its `mask.EXT` file (a tar's `KEY.mask.EXT`); unreadable: empty, a bad
    mask."""
    found = sorted(stem.parent.glob(glob_escape(stem.name) + ".*")) if stem.parent.is_dir() else []
    for p in (p for p in found if p.suffix[1:].lower() in IMAGE_EXTS and p.stem == stem.name):
        try:
            files[f"mask.{p.suffix[1:].lower()}"] = p.read_bytes()
        except OSError:
            files[f"mask.{p.suffix[1:].lower()}"] = b""
        return


def _oriented(img: Image.Image) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ImageOps.exif_transpose(img)


def _alpha(image: bytes) -> Image.Image | None:
    """The image's alpha channel (as seen, after EXIF orientation), or None when it has none."""
    img = Image.open(io.BytesIO(image))
    if img.mode == "P" and "transparency" in img.info or img.mode in ("LA", "PA"):
        img = img.convert("RGBA")
    if img.mode != "RGBA":
        return None
    return _oriented(img).getchannel("A")


def _mask_image(data: bytes) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        return _oriented(img).convert("L")
    except Exception as e:   # any decoder failure on a mask file costs its sample, counted
        raise ImageSkip(SKIP_BAD_MASK, str(e)) from None


def sample_mask(files: dict, image: bytes, width: int, height: int, crop: tuple[int, int]) -> torch.Tensor:
    """uint8 [H, W] at the prepared image's size `crop` (W, H), for a source image of `width` x `height` (as
    seen); 255 everywhere when the sample has no mask. Raises ImageSkip for a bad mask file."""
    data = mask_file(files)
    mask = _mask_image(data) if data is not None else _alpha(image)
    if mask is None:
        return torch.full((crop[1], crop[0]), FULL, dtype=torch.uint8)
    if mask.size != (width, height):
        raise ImageSkip(SKIP_MASK_SIZE, f"mask {mask.size[0]}x{mask.size[1]}, image {width}x{height}")
    mask = resize_center_crop(mask, *crop)
    return torch.frombuffer(bytearray(mask.tobytes()), dtype=torch.uint8).view(crop[1], crop[0])


def latent_mask(masks: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """uint8 pixel masks [B, H, W] -> float16 [B, h, w]: each latent cell the mean of its pixels (in [0, 1]);
    a full mask gives exactly 1."""
    if masks.shape[-2] % h or masks.shape[-1] % w:
        raise ValueError(f"a {masks.shape[-2]}x{masks.shape[-1]} mask does not divide into a {h}x{w} latent")
    pooled = F.avg_pool2d(masks[:, None].float(), (masks.shape[-2] // h, masks.shape[-1] // w))[:, 0]
    return (pooled / FULL).to(torch.float16)
