"""train.report: a run's metrics.jsonl -> DVC's summary (metrics) and loss curve (plots)."""
import csv
import io
import json

import pytest

from train.records import append_record
from train.report import (loss_curve, loss_curve_csv, loss_curve_png, main, read_records, summarize, timings,
                          truncate_records)

# What the trainer logs (train/loop.py): validation records carry val/loss and its per-timestep
# parts (val/loss_t{i}_{n}); training records carry loss, lr and images_per_s.
RECORDS = [
    {"step": 0, "val/loss_t0_2": 1.8, "val/loss_t1_2": 1.2, "val/loss": 1.5},
    {"step": 10, "loss": 1.4, "lr": 1e-3, "images_per_s": 2.0},
    {"step": 20, "loss": 1.0, "lr": 1e-3, "images_per_s": 100.0},   # first half: warm-up, left out of the speed
    {"step": 20, "val/loss_t0_2": 0.9, "val/loss_t1_2": 0.7, "val/loss": 0.8},
    {"step": 30, "loss": 0.6, "lr": 5e-4, "images_per_s": 10.0},
    {"step": 40, "loss": 0.5, "lr": 1e-4, "images_per_s": 12.0},
    {"step": 40, "val/loss_t0_2": 0.5, "val/loss_t1_2": 0.3, "val/loss": 0.4},
]


def _write_run(run_dir, records, blank_lines=False):
    run_dir.mkdir(parents=True, exist_ok=True)
    sep = "\n\n" if blank_lines else "\n"
    (run_dir / "metrics.jsonl").write_text(sep.join(json.dumps(r) for r in records) + "\n")
    return run_dir


def test_summarize_first_and_last_validation_and_speed_after_warmup():
    s = summarize(RECORDS)
    assert s["steps"] == 40
    assert s["val_loss_start"] == 1.5
    assert s["val_loss"] == 0.4
    assert s["val_loss_per_t"] == {"loss_t0_2": 0.5, "loss_t1_2": 0.3}   # from the last validation only
    assert s["train_loss"] == 0.5
    assert "images_per_s" not in s   # a timing, not in the tracked summary
    assert timings(RECORDS)["images_per_s"] == pytest.approx(11.0)   # mean of the second half: 10, 12


def test_summarize_without_speed_reports_none():
    records = [{"step": 5, "loss": 0.9}, {"step": 5, "val/loss": 0.7}]
    s = summarize(records)
    assert timings(records)["images_per_s"] is None
    assert s["val_loss"] == s["val_loss_start"] == 0.7
    assert s["val_loss_per_t"] == {}


@pytest.mark.parametrize("records", [
    [],
    [{"step": 10, "loss": 1.0}],                 # no validation
    [{"step": 0, "val/loss": 1.0}],              # no training
])
def test_summarize_refuses_records_missing_a_kind(records):
    with pytest.raises(ValueError, match="no validation or no training"):
        summarize(records)


def test_loss_curve_merges_train_and_validation_by_step():
    rows = list(csv.DictReader(io.StringIO(loss_curve_csv(RECORDS))))
    assert [r["step"] for r in rows] == ["0", "10", "20", "30", "40"]
    assert rows[0] == {"step": "0", "loss": "", "val_loss": "1.5"}
    assert rows[1] == {"step": "10", "loss": "1.4", "val_loss": ""}
    assert rows[2] == {"step": "20", "loss": "1.0", "val_loss": "0.8"}
    assert rows[4] == {"step": "40", "loss": "0.5", "val_loss": "0.4"}


def test_loss_curve_sorts_steps_logged_out_of_order():
    records = [{"step": 30, "loss": 0.3}, {"step": 10, "loss": 0.9}, {"step": 20, "val/loss": 0.5}]
    rows = list(csv.DictReader(io.StringIO(loss_curve_csv(records))))
    assert [(r["step"], r["loss"], r["val_loss"]) for r in rows] == [("10", "0.9", ""), ("20", "", "0.5"),
                                                                      ("30", "0.3", "")]


def test_read_records_skips_blank_lines(tmp_path):
    run = _write_run(tmp_path / "run", RECORDS, blank_lines=True)
    assert read_records(run) == RECORDS


def test_main_writes_summary_and_curve(tmp_path, capsys):
    run = _write_run(tmp_path / "run", RECORDS)
    summary, curve = tmp_path / "metrics" / "train.json", tmp_path / "metrics" / "loss.csv"
    speed = tmp_path / "metrics" / "timings.json"
    assert main([str(run), "--summary", str(summary), "--curve", str(curve), "--timings", str(speed)]) == 0
    assert json.loads(summary.read_text()) == summarize(RECORDS)
    assert curve.read_bytes() == loss_curve_csv(RECORDS).encode()
    assert json.loads(speed.read_text()) == {"images_per_s": pytest.approx(11.0)}
    assert "1.5000 -> 0.4000 in 40 steps, 11.0 images/s" in capsys.readouterr().out


def test_timings_are_kept_apart_from_the_metrics_and_joined_when_read(tmp_path):
    for r in RECORDS:
        append_record(tmp_path, {**r, **({"data_wait": 0.1} if "images_per_s" in r else {})})
    written = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all("images_per_s" not in r and "data_wait" not in r for r in written)
    assert [json.loads(ln)["step"] for ln in (tmp_path / "timings.jsonl").read_text().splitlines()] == [10, 20, 30, 40]
    assert read_records(tmp_path) == [{**r, "data_wait": 0.1} if "images_per_s" in r else r for r in RECORDS]


def test_a_rerun_writes_the_same_bytes_but_for_what_git_and_dvc_leave_out(tmp_path):
    """The demo's dvc.lock hashes the run folder and metrics.jsonl: two runs of one config on one machine give
    the same files, but for the timings and the trackers' logs (wall times), which .dvcignore leaves out."""
    import hashlib
    import subprocess
    from pathlib import Path

    from train_caches import tiny_config, write_cache

    from train.loop import train
    repo = Path(__file__).resolve().parents[1]
    cache, val = write_cache(tmp_path / "c", 8), write_cache(tmp_path / "v", 4, seed=3, prefix="val")
    files = {}
    for name in ("a", "b"):
        out = tmp_path / name / "data/runs/train"
        train(tiny_config(tmp_path, cache, val, **{"run.output_dir": str(out), "run.max_steps": 2,
                                                   "run.tensorboard": True}))
        files[name] = {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
                       for p in out.rglob("*") if p.is_file() and p.name != "config.json"}   # names its own folder
    differ = sorted(k for k in files["a"].keys() | files["b"].keys() if files["a"].get(k) != files["b"].get(k))
    assert "metrics.jsonl" in files["a"] and "timings.jsonl" in differ
    assert differ and all(k == "timings.jsonl" or k.startswith("logs/") for k in differ), differ
    ignored = subprocess.run(["dvc", "check-ignore", *(f"data/runs/train/{k}" for k in differ)], cwd=repo,
                             capture_output=True, text=True, timeout=120)
    assert sorted(ignored.stdout.split()) == sorted(f"data/runs/train/{k}" for k in differ), ignored.stderr


TRAIN_BLUE, VAL_ORANGE = (31, 119, 180), (255, 127, 14)   # matplotlib's first two line colours (C0, C1)


def _colours(png: bytes) -> set:
    from PIL import Image
    with Image.open(io.BytesIO(png)) as img:
        assert img.size == (800, 450)
        return {c for _, c in img.convert("RGB").getcolors(maxcolors=1 << 20)}


def test_main_also_draws_the_curve_as_a_png(tmp_path):
    run = _write_run(tmp_path / "run", RECORDS)
    plot = tmp_path / "docs" / "loss.png"
    assert main([str(run), "--summary", str(tmp_path / "s.json"), "--curve", str(tmp_path / "c.csv"),
                 "--plot", str(plot)]) == 0
    png = plot.read_bytes()
    assert png == loss_curve_png(loss_curve(RECORDS))          # the same bytes each time: dvc sees no change
    assert {TRAIN_BLUE, VAL_ORANGE} <= _colours(png)
    train_only = loss_curve_png(loss_curve([r for r in RECORDS if "loss" in r]))
    assert TRAIN_BLUE in _colours(train_only) and VAL_ORANGE not in _colours(train_only)


def test_main_missing_run_dir_is_a_one_line_error(tmp_path, capsys):
    summary, curve = tmp_path / "train.json", tmp_path / "loss.csv"
    assert main([str(tmp_path / "absent"), "--summary", str(summary), "--curve", str(curve)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "metrics.jsonl" in err and "\n" not in err
    assert not summary.exists() and not curve.exists()


@pytest.mark.parametrize("content", ["", "\n\n", json.dumps({"step": 10, "loss": 1.0}) + "\n"])
def test_main_empty_or_unvalidated_run_is_a_one_line_error(tmp_path, capsys, content):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(content)
    summary, curve = tmp_path / "train.json", tmp_path / "loss.csv"
    assert main([str(run), "--summary", str(summary), "--curve", str(curve)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "no validation or no training" in err and "\n" not in err
    assert not summary.exists() and not curve.exists()


def test_main_run_dir_without_metrics_file(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()   # the trainer has not logged yet
    assert main([str(run), "--summary", str(tmp_path / "s.json"), "--curve", str(tmp_path / "c.csv")]) == 2
    assert "has the run finished?" in capsys.readouterr().err


def test_truncate_keeps_steps_up_to_the_checkpoint_and_drops_a_torn_last_line(tmp_path):
    run = _write_run(tmp_path / "run", RECORDS)
    path = run / "metrics.jsonl"
    path.write_text(path.read_text() + '{"step": 50, "loss": 0.')     # a kill during the append
    truncate_records(path, 20)
    assert read_records(run) == [r for r in RECORDS if r["step"] <= 20]
    assert path.read_text().endswith("}\n") and [p.name for p in run.iterdir()] == ["metrics.jsonl"]
    path.write_text(path.read_text() + json.dumps({"step": 30, "loss": 0.2}))   # whole, only its newline lost
    truncate_records(path, 30)
    assert read_records(run)[-1] == {"step": 30, "loss": 0.2} and path.read_text().endswith("}\n")


def test_a_damaged_record_before_the_last_is_an_error_naming_it(tmp_path, capsys):
    lines = [json.dumps(r) for r in RECORDS]
    lines.insert(2, '{"step": 15, "lo')
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    before = (run / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match="metrics.jsonl: record 3 is not JSON"):
        truncate_records(run / "metrics.jsonl", 20)
    assert (run / "metrics.jsonl").read_text() == before
    assert main([str(run), "--summary", str(tmp_path / "s.json"), "--curve", str(tmp_path / "c.csv")]) == 2
    assert "record 3 is not JSON" in capsys.readouterr().err
