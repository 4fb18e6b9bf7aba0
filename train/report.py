"""Turn a run's metrics.jsonl into what DVC shows: a summary (metrics) and a loss curve (plots), and
the same curve as a PNG (matplotlib, offline: `dvc plots show` renders through a CDN).

    python -m train.report RUN_DIR --summary metrics/train.json --curve metrics/loss.csv --plot docs/demo_loss.png \
        --timings metrics/timings.json

The summary and the curve hold what a rerun on the same machine reproduces byte for byte (they are
tracked in git, and hashed in dvc.lock); images/s, which differ on every run, go to --timings, a file
that neither git (.gitignore) nor dvc.yaml names.
"""
from __future__ import annotations

import csv
import io
import sys
from pathlib import Path
from typing import Optional

import typer

from shared.cache.files import atomic_write_bytes, atomic_write_json
from shared.params import run_command

from .records import read_records, truncate_records

__all__ = ["loss_curve_csv", "main", "read_records", "summarize", "timings", "truncate_records"]


def summarize(records: list[dict]) -> dict:
    """Final and first validation loss (overall and per timestep), last training loss."""
    vals = [r for r in records if "val/loss" in r]
    train = [r for r in records if "loss" in r]
    if not vals or not train:
        raise ValueError("metrics.jsonl holds no validation or no training records")
    first, last = vals[0], vals[-1]
    return {
        "steps": train[-1]["step"],
        "val_loss": last["val/loss"],
        "val_loss_start": first["val/loss"],
        "val_loss_per_t": {k.split("/", 1)[1]: v for k, v in last.items() if k.startswith("val/loss_t")},
        "train_loss": train[-1]["loss"],
    }


def timings(records: list[dict]) -> dict:
    """Mean images/s over the second half of the training records (after warm-up); None without any."""
    train = [r for r in records if "loss" in r]
    speed = [r["images_per_s"] for r in train[len(train) // 2:] if "images_per_s" in r]
    return {"images_per_s": sum(speed) / len(speed) if speed else None}


def loss_curve(records: list[dict]) -> list[dict]:
    """Per step, in order: {step, loss, val_loss}, None where not measured at that step."""
    rows: dict[int, dict] = {}
    for r in records:
        row = rows.setdefault(r["step"], {"step": r["step"], "loss": None, "val_loss": None})
        if "loss" in r:
            row["loss"] = r["loss"]
        if "val/loss" in r:
            row["val_loss"] = r["val/loss"]
    return [rows[s] for s in sorted(rows)]


def loss_curve_csv(records: list[dict]) -> str:
    """step, train loss, validation loss (empty where not measured at that step)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=["step", "loss", "val_loss"])
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in loss_curve(records))
    return out.getvalue()


def loss_curve_png(curve: list[dict], title: str = "training and validation loss") -> bytes:
    """The curve drawn by matplotlib's Agg renderer (no display, no network), as PNG bytes: the same
    bytes for the same curve (no version or date in the file)."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(8, 4.5), dpi=100)
    ax = fig.add_subplot()
    for key, label, style in (("loss", "training loss", "-"), ("val_loss", "validation loss", "o-")):
        points = [(r["step"], r[key]) for r in curve if r[key] is not None]
        if points:
            ax.plot(*zip(*points), style, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False,
                   rich_markup_mode=None)   # plain help: typer's rich panels show flags as taking a <bool>


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="the trainer's --output-dir"),
    summary_path: Path = typer.Option(..., "--summary", help="JSON summary to write (DVC metrics)"),
    curve_path: Path = typer.Option(..., "--curve", help="CSV loss curve to write (DVC plots)"),
    plot_path: Optional[Path] = typer.Option(None, "--plot", help="the loss curve as a PNG too (matplotlib)"),
    timings_path: Optional[Path] = typer.Option(None, "--timings", help="JSON of images/s to write (untracked: "
                                                                        "it differs on every run)"),
) -> None:
    """Turn a run's metrics.jsonl into what DVC shows: a summary (metrics), a loss curve (plots) and,
    with --plot, the curve as a PNG."""
    try:
        records = read_records(run_dir)
        summary = summarize(records)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(2)
    for path in (summary_path, curve_path, plot_path, timings_path):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(summary_path, summary)
    atomic_write_bytes(curve_path, loss_curve_csv(records).encode())
    if plot_path is not None:
        atomic_write_bytes(plot_path, loss_curve_png(loss_curve(records)))
    speed = timings(records)
    if timings_path is not None:
        atomic_write_json(timings_path, speed)
    rate = f", {speed['images_per_s']:.1f} images/s" if speed["images_per_s"] is not None else ""
    print(f"val loss {summary['val_loss_start']:.4f} -> {summary['val_loss']:.4f} in {summary['steps']} steps{rate}")


def main(argv=None) -> int:
    return run_command(app, argv, "python -m train.report")


if __name__ == "__main__":
    sys.exit(main())
