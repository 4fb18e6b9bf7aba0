"""A run's metrics.jsonl: read by train.report, truncated by a resumed run (the trainer) to its checkpoint."""
from __future__ import annotations

import json
from pathlib import Path

from shared.cache.files import atomic_write_bytes


def read_records(run_dir) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics; has the run finished?")
    return [json.loads(line) for line in _record_lines(path, torn_tail=False)]


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
