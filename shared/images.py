"""Pictures as the models see them, where two stages must agree: RGB from any mode, and a reference image (edit
models) oriented, resized and cropped by the family's rule. encode (preprocess/references.py) and flux-sample
(sample/references.py) both call reference_image, so a trained edit LoRA samples with references prepared as
in its cache."""
from __future__ import annotations

from PIL import Image, ImageOps


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB from any mode; transparency is flattened on white (not black, which would darken edges)."""
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in ("LA", "PA"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        white = Image.new("RGB", img.size, (255, 255, 255))
        white.paste(img, mask=img.getchannel("A"))
        return white
    return img.convert("RGB")   # L, 1, I, F, CMYK, YCbCr, LAB


def reference_image(img: Image.Image, family, count: int, override: int | None = None,
                    size: tuple[int, int] | None = None) -> Image.Image:
    """Reference image `img` (one of `count`), as encoded: EXIF-oriented, RGB, resized to the family's
    reference_resize with PIL's Lanczos filter (diffusers' VaeImageProcessor and Flux2ImageProcessor resample
    so), then centre-cropped to its reference_size (Flux2ImageProcessor's crop; Kontext's sizes need none).
    `override`: --reference-resolution, an area cap of override^2 pixels. `size` (width, height): resized
    whole to exactly that instead (flux-sample --reference-size). Raises ValueError for an image too small
    for a reference (no reference size)."""
    img = to_rgb(ImageOps.exif_transpose(img))
    if size is not None:
        return img if img.size == tuple(size) else img.resize(tuple(size), Image.LANCZOS)
    w, h = img.size
    rw, rh = family.reference_resize(w, h, count, override)
    cw, ch = family.reference_size(w, h, count, override)
    if min(cw, ch) <= 0:
        raise ValueError(f"{w}x{h}: too small for a {family.name} reference")
    if (rw, rh) != img.size:
        img = img.resize((rw, rh), Image.LANCZOS)
    left, top = (rw - cw) // 2, (rh - ch) // 2
    return img.crop((left, top, left + cw, top + ch))
