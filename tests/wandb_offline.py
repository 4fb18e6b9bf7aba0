"""Read what wandb wrote in offline mode: the records of a run's `.wandb` file.

The file is a LevelDB-style log (what `wandb sync` uploads): a 7-byte header (`:W&B`, magic, version),
then 32 KiB blocks of records, each a 7-byte header (crc32, length, kind: 1 whole, 2/3/4 first/middle/
last piece) and a piece of one protobuf `Record` (wandb.proto)."""
from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK, HEADER = 32768, 7
WHOLE, LAST = 1, 4


def records(path):
    from wandb.proto import wandb_internal_pb2 as pb
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a wandb run file")
    pos, pieces = HEADER, b""
    while pos + HEADER <= len(data):
        room = BLOCK - pos % BLOCK
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if room < HEADER or (length == 0 and kind == 0):   # the rest of a block is padding
            pos += room
            continue
        pieces += data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind in (WHOLE, LAST):
            record = pb.Record()
            record.ParseFromString(pieces)
            pieces = b""
            yield record


def _key(item) -> str:
    """An item's key: `key`, or (as wandb-core writes them) `nested_key`, the path into nested dicts."""
    return item.key or ".".join(item.nested_key)


def history(path) -> list[dict]:
    """Each logged row as {key: value}, wandb's own `_step`, `_runtime` and `_timestamp` included."""
    return [{_key(item): json.loads(item.value_json) for item in r.history.item}
            for r in records(path) if r.WhichOneof("record_type") == "history"]


def config(path) -> dict:
    out = {}
    for r in records(path):
        if r.WhichOneof("record_type") == "config":
            out.update({_key(item): json.loads(item.value_json) for item in r.config.update})
    return out
