"""Image preparation: orientation, colour modes, resize/crop and buckets."""
from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from preprocess.images import (ImageSkip, make_buckets, nearest_bucket, prepare_image, resize_center_crop,
                               to_model_range)


def _save(img, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_exif_orientation_is_applied():
    # Stored landscape: left half red, right half blue. Orientation 6 = display rotated 90 degrees
    # clockwise, so the displayed image is portrait with red on top.
    img = Image.new("RGB", (64, 32), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 32, 32))
    exif = Image.Exif()
    exif[0x0112] = 6
    out = prepare_image(_save(img, "JPEG", quality=95, exif=exif), 32, jpeg_draft=False)
    assert (out.width, out.height) == (32, 64)
    top, bottom = out.pixels[:, 2, 16].tolist(), out.pixels[:, 29, 16].tolist()
    assert top[0] > 200 and top[2] < 60      # red
    assert bottom[2] > 200 and bottom[0] < 60  # blue


@pytest.mark.parametrize("mode,color,expected", [
    ("L", 128, (128, 128, 128)),
    ("RGBA", (0, 0, 0, 0), (255, 255, 255)),          # transparent -> white, not black
    ("LA", (0, 0), (255, 255, 255)),
    ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
    ("RGB", (10, 20, 30), (10, 20, 30)),
])
def test_modes_become_rgb(mode, color, expected):
    fmt = "TIFF" if mode == "CMYK" else "PNG"
    out = prepare_image(_save(Image.new(mode, (40, 40), color), fmt), 32)
    assert out.pixels.shape == (3, 32, 32) and out.pixels.dtype == torch.uint8
    assert tuple(out.pixels[:, 16, 16].tolist()) == expected


def test_palette_with_transparency_flattened_on_white():
    img = Image.new("P", (40, 40), 0)
    img.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
    img.paste(1, (0, 0, 20, 40))
    out = prepare_image(_save(img, "PNG", transparency=0), 32)
    assert tuple(out.pixels[:, 16, 2].tolist()) == (200, 0, 0)
    assert tuple(out.pixels[:, 16, 30].tolist()) == (255, 255, 255)


def test_resize_short_side_then_center_crop():
    img = Image.new("RGB", (100, 50), (0, 0, 0))
    img.paste((255, 255, 255), (25, 0, 75, 50))   # the middle half is white
    out = resize_center_crop(img, 32, 32)
    assert out.size == (32, 32)
    assert min(out.getpixel((x, 16))[0] for x in range(1, 31)) > 200   # the crop is all middle


def test_buckets_about_target_area_multiples_of_16():
    buckets = make_buckets(256)
    assert (256, 256) in buckets
    for w, h in buckets:
        assert w % 16 == 0 and h % 16 == 0
        assert 0.8 < w * h / 256 ** 2 < 1.2
    assert nearest_bucket(1000, 1000, buckets) == (256, 256)
    w, h = nearest_bucket(2000, 1000, buckets)
    assert 1.8 < w / h < 2.2
    w, h = nearest_bucket(600, 800, buckets)
    assert h > w and abs(w / h - 0.75) < 0.08


def test_bucketed_image_gets_the_bucket_size():
    out = prepare_image(_save(Image.new("RGB", (128, 64), (9, 9, 9))), 64, buckets=make_buckets(64))
    assert out.pixels.shape[1:] == (48, 96) and (out.width, out.height) == (128, 64)


def test_skips_and_value_range():
    with pytest.raises(ImageSkip) as e:
        prepare_image(_save(Image.new("RGB", (10, 30))), 32, min_size=16)
    assert e.value.reason == "too_small"
    with pytest.raises(ImageSkip) as e:
        prepare_image(b"", 32)
    assert e.value.reason == "empty_file"
    x = to_model_range(torch.tensor([0, 255], dtype=torch.uint8))
    assert x.tolist() == [-1.0, 1.0]
