"""Reference images of paired (edit) data: where a sample's references are, and how each is prepared.

A tar sample's reference is a member `KEY.ref.EXT` (one) or `KEY.ref0.EXT`, `KEY.ref1.EXT`, ... (several): in
webdataset's grouping they are the sample's files `ref.EXT`, `ref0.EXT`. In a folder, reference i of
`dir/img.EXT` is `dir/control{i}/img.*` or `dir/reference{i}/img.*`, and reference 0 may also be in
`dir/control/` or `dir/reference/`; the folder reader files them under the same names (`ref0.EXT`, `ref.EXT`),
so one rule reads both. `--references N` takes references 0..N-1 (extra ones are left out); a sample missing
one is skipped as missing_reference, one whose reference is unreadable, empty, under 16 pixels a side or
given twice (`ref.jpg` and `ref0.png`) as bad_reference.

A reference is resized as the family's edit pipeline resizes it (family.reference_resize and reference_size:
FluxKontextPipeline's preferred resolutions, Flux2 pipelines' area cap, or --reference-resolution) with PIL's
Lanczos filter (diffusers' VaeImageProcessor), then centre-cropped to multiples of 16: shared/images.py's
reference_image, which flux-sample --image calls too.
"""
from __future__ import annotations

import re
import struct
import warnings
from glob import escape as glob_escape
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from shared.images import reference_image

from .images import ImageSkip, Prepared, open_image, oriented_size
from .sources import IMAGE_EXTS

SKIP_MISSING_REFERENCE = "missing_reference"
SKIP_BAD_REFERENCE = "bad_reference"
# A folder of references beside the images: control/, reference/, control0/, reference1/, ...
REFERENCE_FOLDER = re.compile(r"^(control|reference)(\d*)$")


def is_reference_folder(name: str) -> bool:
    return REFERENCE_FOLDER.match(name) is not None


def folder_reference_name(folder_name: str) -> str:
    """The sample file name stem a reference folder's files are filed under: control -> ref, control1 -> ref1."""
    return "ref" + REFERENCE_FOLDER.match(folder_name).group(2)


def add_folder_references(files: dict, image_dir: Path, stem: str, listed: dict[Path, list[Path]]) -> None:
    """File the references of `image_dir/stem.*` found in its reference folders into a sample's `files` as
    `ref.EXT` / `ref{i}.EXT`; unreadable files are left out (counted as missing). `listed`: each image folder's
    reference folders, listed once per shard."""
    if image_dir not in listed:
        listed[image_dir] = sorted(p for p in image_dir.iterdir() if p.is_dir() and is_reference_folder(p.name))
    for sub in listed[image_dir]:
        for p in sub.glob(f"{glob_escape(stem)}.*"):
            if p.is_file() and p.stem == stem and p.suffix[1:].lower() in IMAGE_EXTS:
                try:
                    files[f"{folder_reference_name(sub.name)}.{p.suffix[1:].lower()}"] = p.read_bytes()
                except OSError:
                    continue


def reference_bytes(files: dict, count: int) -> tuple[list[bytes] | None, str | None]:
    """The sample's references 0..count-1 as bytes, or (None, skip reason)."""
    out = []
    for i in range(count):
        names = ("ref", "ref0") if i == 0 else (f"ref{i}",)
        found = [f"{n}.{ext}" for n in names for ext in IMAGE_EXTS if f"{n}.{ext}" in files]
        if not found:
            return None, SKIP_MISSING_REFERENCE
        if len(found) > 1 or not files[found[0]]:
            return None, SKIP_BAD_REFERENCE      # which of two is meant? an empty file is no image
        out.append(files[found[0]])
    return out, None


def reference_target(width: int, height: int, family, count: int, override: int | None):
    """(resize to, crop to) sizes of a width x height reference; raises ImageSkip when under 16 pixels."""
    resize = family.reference_resize(width, height, count, override)
    crop = family.reference_size(width, height, count, override)
    if min(crop) <= 0:
        raise ImageSkip(SKIP_BAD_REFERENCE, f"{width}x{height}: too small for a reference")
    return resize, crop


def prepare_reference(data: bytes, family, count: int, override: int | None = None) -> Prepared:
    """Bytes -> Prepared (uint8 pixels at the family's reference size, the source size); raises ImageSkip
    (bad_reference)."""
    try:
        img = open_image(data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            w, h = oriented_size(img)
            reference_target(w, h, family, count, override)   # too small: skipped before decoding
            img.load()
            img = reference_image(img, family, count, override)   # flux-sample --image's rule too
    except ImageSkip as e:
        raise ImageSkip(SKIP_BAD_REFERENCE, str(e)) from None
    except (OSError, ValueError, SyntaxError, struct.error, EOFError, IndexError, KeyError,
            Image.DecompressionBombError) as e:
        raise ImageSkip(SKIP_BAD_REFERENCE, str(e)) from None
    arr = np.asarray(img, dtype=np.uint8)
    return Prepared(pixels=torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous(), width=w, height=h)


def reference_folder_warning(spec: str) -> str | None:
    """A warning for a folder input holding reference folders while --references is 0: they would be read as
    images of their own."""
    folder = Path(spec)
    if "::" in spec or "://" in spec or not folder.is_dir() or any(folder.glob("*.tar")):
        return None
    found = sorted(p for p in folder.rglob("*") if p.is_dir() and is_reference_folder(p.name))
    if not found:
        return None
    return (f"{', '.join(map(str, found[:3]))}: reference folders, read as images of their own since --references "
            "is 0; pass --references N to encode them as the samples' reference images")
