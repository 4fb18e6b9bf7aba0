"""The embedded demo's caption grammar, `a {color} {shape} on a {background} background`:
the demo data draws it (preprocess) and the sample evaluation checks it (sample)."""
from __future__ import annotations

import re

COLORS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (235, 215, 30)}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0)}

_PATTERN = re.compile(r"^a (\w+) (\w+) on a (\w+) background$")


def caption_for(color: str, shape: str, background: str) -> str:
    return f"a {color} {shape} on a {background} background"


def parse_caption(caption: str) -> tuple[str, str, str] | None:
    """(color, shape, background) of a caption in the grammar, else None."""
    m = _PATTERN.match(caption.strip())
    if not m or m[1] not in COLORS or m[2] not in SHAPES or m[3] not in BACKGROUNDS:
        return None
    return m[1], m[2], m[3]
