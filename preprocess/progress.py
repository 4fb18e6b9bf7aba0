"""Resume bookkeeping: the run's settings, one done-record per input shard, orphan cleanup,
and the manifest built from the done-records.

Exactly-once rests on one order of writes: an input shard's output shards are renamed into
place first, its done-record is written (atomically) last. A shard without a done-record
is not done, whatever files it left behind; a rerun deletes those files and encodes the
shard again. Output names derive from the input shard's id, so every rank of every run
knows which leftovers are its own, whatever the number of processes.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from shared.cache import atomic_write_json, write_manifest
from shared.cache.schema import EMPTY_PROMPT_NAME

PROGRESS_DIR = "_progress"
SETTINGS_NAME = "settings.json"
DONE_DIR = "done"
# What must match between runs writing into one cache; anything else (batch size, workers,
# rows per shard, device) may change across a resume.
SETTINGS_KEYS = ("encoders", "image", "t5", "dtypes", "compute_dtype", "t5_wo_dtype", "dims", "vae")


class SettingsMismatch(Exception):
    """A rerun into an existing cache with other encoders or preparation options."""


def progress_dir(out_dir: Path) -> Path:
    return Path(out_dir) / PROGRESS_DIR


def done_path(out_dir: Path, shard_id: str) -> Path:
    return progress_dir(out_dir) / DONE_DIR / f"{shard_id}.json"


def _comparable(settings: dict) -> dict:
    """Encoders compare by weight hash (a moved folder is the same model), else by source."""
    out = {k: settings.get(k) for k in SETTINGS_KEYS}
    out["encoders"] = {part: (ident.get("sha256") or ident.get("source"))
                       for part, ident in (settings.get("encoders") or {}).items()}
    return out


def check_or_write_settings(out_dir: Path, settings: dict) -> None:
    """Record the run's settings on the first run; refuse a later run whose settings differ."""
    path = progress_dir(out_dir) / SETTINGS_NAME
    if path.is_file():
        old = json.loads(path.read_text())
        a, b = _comparable(old), _comparable(settings)
        diffs = [f"{k}: cache has {json.dumps(a[k], sort_keys=True)}, this run {json.dumps(b[k], sort_keys=True)}"
                 for k in SETTINGS_KEYS if a[k] != b[k]]
        if diffs:
            raise SettingsMismatch(
                f"{out_dir} was encoded with other settings; refusing to mix caches ("
                + "; ".join(diffs) + "). Use a new --output folder, or rerun with the cache's settings.")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, settings)


def read_settings(out_dir: Path) -> dict:
    return json.loads((progress_dir(out_dir) / SETTINGS_NAME).read_text())


def read_done(out_dir: Path) -> dict[str, dict]:
    """Every done-record of the cache, by input shard id."""
    folder = progress_dir(out_dir) / DONE_DIR
    records = {}
    if folder.is_dir():
        for p in sorted(folder.glob("*.json")):
            records[p.stem] = json.loads(p.read_text())
    return records


def write_done(out_dir: Path, shard_id: str, record: dict) -> None:
    path = done_path(out_dir, shard_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, record)


def output_pattern(shard_id: str) -> re.Pattern:
    """Files an input shard's encoding may leave: its output shards and their temp files."""
    sid = re.escape(shard_id)
    return re.compile(rf"^(\.)?{sid}-\d{{5}}\.parquet(\.\d+\.tmp)?$")


def remove_orphans(out_dir: Path, shard_ids: list[str], sweep_json_temps: bool = False) -> list[str]:
    """Delete output shards and temp files of the given input shards (none of them done).

    `sweep_json_temps` (one rank only) also removes temp files of atomic JSON writes that a
    killed process left (done-records, settings, manifest)."""
    out_dir = Path(out_dir)
    removed = []
    if out_dir.is_dir() and shard_ids:
        patterns = [output_pattern(s) for s in shard_ids]
        for p in out_dir.iterdir():
            if p.is_file() and any(pat.match(p.name) for pat in patterns):
                p.unlink(missing_ok=True)
                removed.append(p.name)
    if sweep_json_temps:
        for folder in (out_dir, progress_dir(out_dir), progress_dir(out_dir) / DONE_DIR):
            if folder.is_dir():
                for p in folder.glob(".*.tmp"):
                    if not p.name.endswith(".parquet") and ".parquet." not in p.name:
                        p.unlink(missing_ok=True)
                        removed.append(p.name)
    return removed


def build_manifest(out_dir: Path, command: str, version: str) -> dict:
    """The manifest covering every done input shard."""
    settings = read_settings(out_dir)
    done = read_done(out_dir)
    shards, skipped, rows = [], {}, 0
    for shard_id, rec in done.items():
        shards += rec["outputs"]
        rows += rec["rows"]
        for reason, n in rec["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
    return {
        "dtypes": settings["dtypes"], "dims": settings["dims"], "t5": settings["t5"],
        "shards": shards, "rows": rows, "skipped": dict(sorted(skipped.items())),
        "empty_prompt": EMPTY_PROMPT_NAME, "encoders": settings["encoders"], "vae": settings["vae"],
        "image": settings["image"], "compute_dtype": settings["compute_dtype"],
        "t5_wo_dtype": settings.get("t5_wo_dtype"),
        "inputs_done": [{"id": k, "url": v["url"], "rows": v["rows"]} for k, v in done.items()],
        "command": command, "version": version,
    }


def finish_if_complete(out_dir: Path, all_shard_ids: list[str], command: str, version: str) -> bool:
    """Write the manifest if every input shard of this run is done (the last rank to finish does)."""
    done = read_done(out_dir)
    if any(s not in done for s in all_shard_ids):
        return False
    write_manifest(out_dir, build_manifest(out_dir, command, version))
    return True
