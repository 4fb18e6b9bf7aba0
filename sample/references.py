"""flux-sample's reference images (--image, edit models: FLUX.1 Kontext, FLUX.2): each read and prepared as encode
prepares a reference for the cache (shared/images.py reference_image: the family's reference size, or
--reference-resolution's area cap, or --reference-size exactly), VAE-encoded to its posterior mean, normalised
and packed by the family; the family's predict places the tokens (shared/family/)."""
from __future__ import annotations

from pathlib import Path

import torch

from shared.images import reference_image

from .resolve import SampleError


def parse_size(text: str) -> tuple[int, int]:
    """'WxH' -> (width, height) in pixels, multiples of 16 (2x2 patches of the 8x VAE)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SampleError(f"--reference-size {text!r}: give WIDTHxHEIGHT in pixels, e.g. 1024x768") from None
    if w <= 0 or h <= 0 or w % 16 or h % 16:
        raise SampleError(f"--reference-size {text!r}: width and height must be positive multiples of 16")
    return w, h


def planned_references(family, paths: list[Path], size: str | None, resolution: int | None) -> list:
    """flux-sample's --image, --reference-size and --reference-resolution, checked and the images prepared."""
    if (size or resolution) and not paths:
        raise SampleError(f"{'--reference-size' if size else '--reference-resolution'} sizes the --image "
                          "references; give --image too")
    if size and resolution:
        raise SampleError("--reference-size and --reference-resolution both size the references: give one")
    try:
        return reference_images(family, list(paths), parse_size(size) if size else None, resolution)
    except ValueError as e:   # more references than the family places
        raise SampleError(str(e)) from None


def reference_images(family, paths: list[Path], size: tuple[int, int] | None = None,
                     resolution: int | None = None) -> list:
    """Each --image prepared (PIL, RGB, at its reference size), before any weights load: `size` (width, height)
    where given, else the family's rule for the image and the reference count, capped at about resolution^2
    pixels where given (as encode --reference-resolution)."""
    from PIL import Image
    family.check_references(len(paths), "--image")
    out = []
    for path in paths:
        try:
            with Image.open(path) as img:
                img.load()
                out.append(reference_image(img, family, len(paths), resolution, size))
        except (OSError, ValueError) as e:
            raise SampleError(f"--image {path}: cannot use the image ({e})") from None
    return out


@torch.no_grad()
def encode_references(family, vae, images: list, device, dtype) -> list:
    """The predict's refs: (tokens [1, Nr, D], latent h, w) per prepared image: scaled to [-1, 1] by diffusers'
    VaeImageProcessor (as the pipelines prepare an image; no resize, it is at its size), the VAE posterior's
    mean, the family's to_x0 and packing."""
    from diffusers.image_processor import VaeImageProcessor
    processor = VaeImageProcessor(vae_scale_factor=16)
    facts = family.vae_facts(vae)
    refs = []
    for img in images:
        pixels = processor.preprocess(img, height=img.height, width=img.width)
        mean = vae.encode(pixels.to(device, vae.dtype)).latent_dist.mode()
        refs.append((family.pack(family.to_x0(mean, facts)).to(dtype), int(mean.shape[-2]), int(mean.shape[-1])))
    return refs
