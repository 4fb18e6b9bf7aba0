"""A run's metrics.jsonl and timings.jsonl: written by the trainer, read by train.report (and the benchmarks),
truncated by a resumed run to its checkpoint.

Wall-clock measures (images/s, the share of time waiting for data) differ on every run, so they go to
timings.jsonl, and metrics.jsonl holds what the same run reproduces byte for byte on the same machine:
dvc's hash of the run folder (dvc.lock) then changes only with the training itself (.dvcignore leaves
timings.jsonl and the trackers' logs/, which hold wall times, out of it)."""
from __future__ import annotations

import json
from pathlib import Path

from shared.cache.files import atomic_write_bytes

METRICS, TIMINGS = "metrics.jsonl", "timings.jsonl"
TIMING_KEYS = ("images_per_s", "data_wait")


def append_record(run_dir, record: dict) -> None:
    """A metrics record, its timing keys apart (into timings.jsonl, with the step)."""
    timings = {k: record[k] for k in TIMING_KEYS if k in record}
    _append(Path(run_dir) / METRICS, {k: v for k, v in record.items() if k not in TIMING_KEYS})
    if timings:
        _append(Path(run_dir) / TIMINGS, {"step": record["step"], **timings})


def _append(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_records(run_dir) -> list[dict]:
    """metrics.jsonl's records, each training record (one with a loss) with its step's timings joined in."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics; has the run finished?")
    records = [json.loads(line) for line in _record_lines(path, torn_tail=False)]
    timings_path = Path(run_dir) / TIMINGS
    if timings_path.is_file():
        timings = {t["step"]: t for t in map(json.loads, _record_lines(timings_path, torn_tail=True))}
        records = [{**r, **timings.get(r["step"], {})} if "loss" in r else r for r in records]
    return records


def truncate_run_records(run_dir, step: int) -> None:
    """A resumed run's metrics and timings, cut back to its checkpoint's `step`."""
    for name in (METRICS, TIMINGS):
        truncate_records(Path(run_dir) / name, step)


def _record_lines(path: Path, torn_tail: bool) -> list[str]:
    """metrics.jsonl's non-blank lines. With `torn_tail`, an unreadable last line is dropped: what a
    kill during the trainer's append leaves (half a line). Any other unreadable line is an error."""
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    for n, line in enumerate(lines, 1):
        try:
            json.loads(line)
        except json.JSONDecodeError:
            if torn_tail and n == len(lines):
                return lines[:-1]
            raise ValueError(f"{path}: record {n} is not JSON: {line[:80]!r}") from None
    return lines


def truncate_records(path, step: int) -> None:
    """Keep the records of steps up to `step`, dropping a torn last line (a resumed run repeats what its
    predecessor logged after its last checkpoint). Rewritten atomically: a kill here loses nothing."""
    path = Path(path)
    if path.is_file():
        keep = [ln for ln in _record_lines(path, torn_tail=True) if json.loads(ln).get("step", 0) <= step]
        atomic_write_bytes(path, "".join(ln + "\n" for ln in keep).encode())
