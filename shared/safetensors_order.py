"""safetensors files with the same bytes for the same tensors and metadata.

The safetensors library writes a file's metadata through a hash map, so a metadata of several keys comes out
in another order on every call (three saves of the same tensors, three hashes): a cache's sample-prompts
file, a LoRA written by diffusers' save_lora_weights (format + adapter config) and our exports would change
their bytes, and their dvc hashes, on every run. Here the header's metadata is rewritten with its keys sorted,
in the same number of bytes (the same compact JSON, reordered), so nothing else in the file moves."""
from __future__ import annotations

import json
from pathlib import Path

_SEPARATORS = (",", ":")   # the library's compact JSON


def canonical(data: bytes) -> bytes:
    """The same safetensors bytes with the header's __metadata__ keys sorted."""
    n = int.from_bytes(data[:8], "little")
    header = _canonical_header(data[8:8 + n])
    return data[:8] + header + data[8 + n:] if header is not None else data


def canonicalize_file(path) -> None:
    """Rewrite a safetensors file's header in place (its length is unchanged)."""
    path = Path(path)
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = _canonical_header(f.read(n))
        if header is not None:
            f.seek(8)
            f.write(header)


def _canonical_header(raw: bytes) -> bytes | None:
    text = raw.decode("utf-8")
    body = text.rstrip(" ")     # the library pads the header with spaces to an 8-byte multiple
    header = json.loads(body)
    meta = header.get("__metadata__")
    if not meta or len(meta) < 2:
        return None
    # Rebuild the object with only __metadata__'s entries reordered: the tensors' entries keep their order.
    parts = [f"{json.dumps(k, ensure_ascii=False)}:" + (
        json.dumps(dict(sorted(v.items())), ensure_ascii=False, separators=_SEPARATORS) if k == "__metadata__"
        else json.dumps(v, ensure_ascii=False, separators=_SEPARATORS)) for k, v in header.items()]
    new = ("{" + ",".join(parts) + "}").encode("utf-8")
    if len(new) != len(body.encode("utf-8")):
        return None          # not the library's own compact form: leave the file as it is
    return new + raw[len(new):]
