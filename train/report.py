"""Turn a run's metrics.jsonl into what DVC shows: a summary (metrics) and a loss curve (plots).

    python -m train.report RUN_DIR --summary metrics/train.json --curve metrics/loss.csv
"""
from __future__ import annotations

import csv
import io
import sys
from pathlib import Path

import typer

from shared.cache.files import atomic_write_bytes, atomic_write_json
from shared.params import run_command

from .records import read_records, truncate_records

__all__ = ["loss_curve_csv", "main", "read_records", "summarize", "truncate_records"]


def summarize(records: list[dict]) -> dict:
    """Final and first validation loss (overall and per timestep), last training loss, images/s."""
    vals = [r for r in records if "val/loss" in r]
    train = [r for r in records if "loss" in r]
    if not vals or not train:
        raise ValueError("metrics.jsonl holds no validation or no training records")
    first, last = vals[0], vals[-1]
    speed = [r["images_per_s"] for r in train[len(train) // 2:] if "images_per_s" in r]   # after warm-up
    return {
        "steps": train[-1]["step"],
        "val_loss": last["val/loss"],
        "val_loss_start": first["val/loss"],
        "val_loss_per_t": {k.split("/", 1)[1]: v for k, v in last.items() if k.startswith("val/loss_t")},
        "train_loss": train[-1]["loss"],
        "images_per_s": sum(speed) / len(speed) if speed else None,
    }


def loss_curve_csv(records: list[dict]) -> str:
    """step, train loss, validation loss (empty where not measured at that step)."""
    rows: dict[int, dict] = {}
    for r in records:
        row = rows.setdefault(r["step"], {"step": r["step"], "loss": "", "val_loss": ""})
        if "loss" in r:
            row["loss"] = r["loss"]
        if "val/loss" in r:
            row["val_loss"] = r["val/loss"]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=["step", "loss", "val_loss"])
    writer.writeheader()
    writer.writerows(rows[s] for s in sorted(rows))
    return out.getvalue()


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="the trainer's --output-dir"),
    summary_path: Path = typer.Option(..., "--summary", help="JSON summary to write (DVC metrics)"),
    curve_path: Path = typer.Option(..., "--curve", help="CSV loss curve to write (DVC plots)"),
) -> None:
    """Turn a run's metrics.jsonl into what DVC shows: a summary (metrics) and a loss curve (plots)."""
    try:
        records = read_records(run_dir)
        summary = summarize(records)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(2)
    for path in (summary_path, curve_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(summary_path, summary)
    atomic_write_bytes(curve_path, loss_curve_csv(records).encode())
    print(f"val loss {summary['val_loss_start']:.4f} -> {summary['val_loss']:.4f} in {summary['steps']} steps")


def main(argv=None) -> int:
    return run_command(app, argv, "python -m train.report")


if __name__ == "__main__":
    sys.exit(main())
