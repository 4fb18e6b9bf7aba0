"""A sample's captions, as encode stores them: several per image, a prefix, tag-shuffled variants.

Where captions come from (sources.py's CAPTION_EXTS, the first a sample has): each non-empty line of a
.txt or .caption is one caption (a one-line file: its text, as before); a .json gives its `caption` field,
a string (one caption, newlines and all, as img2dataset writes it) or a list of strings. A prefix (a
trigger word) is put before every caption, joined by PREFIX_SEPARATOR. Variants: for tag-style captions
("a, b, c") N more captions with the tags shuffled: all tags when a prefix leads (the prefix stays first),
else all but the first (kohya's keep_tokens=1: the first tag is often the subject or trigger). The shuffles
come from a generator seeded by the row's key, so a rerun or a resumed encode writes the same captions. A
row's captions are unique: a repeated line or a variant equal to an earlier caption is encoded once.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

PREFIX_SEPARATOR = ", "
TAG_SEPARATOR = ","


@dataclass(frozen=True)
class CaptionOptions:
    prefix: str = ""        # put before every caption (a trigger word), joined by PREFIX_SEPARATOR
    variants: int = 0       # tag-shuffled variants of each tag-style caption

    def __post_init__(self):
        if self.variants < 0:
            raise ValueError(f"--caption-variants must be >= 0, not {self.variants}")
        object.__setattr__(self, "prefix", self.prefix.strip())

    def settings(self) -> dict | None:
        """What the encode settings record (None: the defaults, recorded as nothing, as before)."""
        if not self.prefix and not self.variants:
            return None
        return {"prefix": self.prefix, "separator": PREFIX_SEPARATOR, "variants": self.variants}


def split_lines(data: bytes) -> tuple[list[str] | None, str | None]:
    """A text caption file's captions (its non-empty lines, stripped), or (None, "bad"/"empty")."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None, "bad"
    lines = [line.strip() for line in text.split("\n")]   # "\r\n" too; not splitlines' rarer breaks
    lines = [line for line in lines if line]
    return (lines, None) if lines else (None, "empty")


def json_captions(data: bytes) -> tuple[list[str] | None, str | None]:
    """A .json's captions: its `caption` string or list of strings; (None, "bad") for text that is not
    UTF-8, (None, "none") where it holds no caption."""
    try:
        meta = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError:
        return None, "bad"
    except json.JSONDecodeError:
        return None, "none"
    found = meta.get("caption") if isinstance(meta, dict) else None
    if isinstance(found, str):
        found = [found]
    if not isinstance(found, list) or not all(isinstance(c, str) for c in found):
        return None, "none"
    captions = [c.strip() for c in found if c.strip()]
    return (captions, None) if captions else (None, "none")


# Shuffles drawn per variant asked at most: a caption of few tags has fewer orders than variants asked.
DRAWS_PER_VARIANT = 8


def tag_variants(caption: str, count: int, rng: np.random.Generator, keep_first: bool) -> list[str]:
    """Up to `count` distinct shuffles of a tag-style caption's tags, none equal to the caption (none where
    fewer than two tags would move; fewer where the tags have fewer orders)."""
    tags = [t.strip() for t in caption.split(TAG_SEPARATOR) if t.strip()]
    fixed, moving = (tags[:1], tags[1:]) if keep_first else ([], tags)
    if len(moving) < 2:
        return []
    join, found = TAG_SEPARATOR + " ", {}
    for _ in range(count * DRAWS_PER_VARIANT):
        variant = join.join(fixed + [moving[i] for i in rng.permutation(len(moving))])
        if variant != caption:
            found[variant] = None
        if len(found) == count:
            break
    return list(found)


def row_captions(captions: list[str], row_key: str, opts: CaptionOptions) -> list[str]:
    """The captions a row stores, the first one first: each caption, its variants after the read
    captions, the prefix on every one, repeats dropped."""
    out = list(captions)
    if opts.variants:
        rng = np.random.default_rng(key_seed(row_key))
        for c in captions:
            out += tag_variants(c, opts.variants, rng, keep_first=not opts.prefix)
    if opts.prefix:
        out = [f"{opts.prefix}{PREFIX_SEPARATOR}{c}" for c in out]
    return list(dict.fromkeys(out))


def key_seed(row_key: str) -> int:
    """A seed fixed by the row's key (unique in the cache, the same on every rerun)."""
    return int.from_bytes(hashlib.sha256(f"captions|{row_key}".encode()).digest()[:8], "little")
