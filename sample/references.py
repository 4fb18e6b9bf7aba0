"""flux-sample's reference images (--image, edit models: FLUX.1 Kontext, FLUX.2): each read, resized to its
reference size, VAE-encoded to its posterior mean as encode stores a reference in the cache, normalised and
packed by the family; the family's predict places the tokens (shared/family/)."""
from __future__ import annotations

from pathlib import Path

import torch

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


def reference_sizes(family, paths: list[Path], override: tuple[int, int] | None) -> list[tuple[int, int]]:
    """Each reference's (width, height): `override` where given, else the family's reference_size for the
    image's own size and the reference count. Images are checked here, before any weights load."""
    from PIL import Image
    family.check_references(len(paths), "--image")
    sizes = []
    for path in paths:
        try:
            with Image.open(path) as img:
                own = img.size
        except (OSError, ValueError) as e:
            raise SampleError(f"--image {path}: cannot read the image ({e})") from None
        sizes.append(override or family.reference_size(own[0], own[1], len(paths)))
    return sizes


@torch.no_grad()
def encode_references(family, vae, paths: list[Path], sizes: list[tuple[int, int]], device, dtype) -> list:
    """The predict's refs: (tokens [1, Nr, D], latent h, w) per image: RGB, resized to its size and scaled to
    [-1, 1] by diffusers' VaeImageProcessor (as the pipelines prepare an image), the VAE posterior's mean,
    the family's to_x0 and packing."""
    from diffusers.image_processor import VaeImageProcessor
    from PIL import Image
    processor = VaeImageProcessor(vae_scale_factor=16)
    facts = family.vae_facts(vae)
    refs = []
    for path, (w, h) in zip(paths, sizes):
        with Image.open(path) as img:
            pixels = processor.preprocess(img.convert("RGB"), height=h, width=w)
        mean = vae.encode(pixels.to(device, vae.dtype)).latent_dist.mode()
        refs.append((family.pack(family.to_x0(mean, facts)).to(dtype), int(mean.shape[-2]), int(mean.shape[-1])))
    return refs
