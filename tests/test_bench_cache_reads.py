"""The benchmarks of reading the cache from S3 run (on the CPU, tiny sizes): bench/train.py's trainer rows
from disk and from moto's S3 server see the same rows, and bench/cache_read.py reports both sources.
Their figures are the GPU machine's (docs/BENCHMARKS.md); here only that they run and agree."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"

pytest.importorskip("moto")
pytest.importorskip("s3fs")


def run_bench(script: str, *args, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, str(BENCH / script), *args, "--cache-root", str(tmp_path / "caches")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def test_train_bench_reads_the_same_rows_from_disk_and_from_s3(tmp_path):
    out = tmp_path / "rows.json"
    r = run_bench("train.py", "--device", "cpu", "--tiny", "--rows", "trainer", "--text", "trimmed",
                  "--steps", "2", "--warmup", "1", "--cache-from", "local,s3", "--json", str(out), tmp_path=tmp_path)
    rows = json.loads(out.read_text())["rows"]
    assert [(row["row"], row["cache"]) for row in rows] == [("trainer", "local"), ("trainer", "s3")]
    local, remote = rows
    assert remote["cache_url"].startswith("s3://bench/") and Path(local["cache_url"]).is_dir()
    assert local["losses"] and local["losses"] == remote["losses"]      # the same rows in the same order
    assert all(0 <= row["data_wait"] < 1 and row["images_per_s"] > 0 for row in rows)
    assert "trainer   trimmed     s3" in r.stdout


def test_train_bench_refuses_a_cache_source_it_does_not_know(tmp_path):
    r = subprocess.run([sys.executable, str(BENCH / "train.py"), "--device", "cpu", "--tiny", "--cache-from", "gcs"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--cache-from: a comma list of local and s3" in r.stderr


def test_cache_read_bench_reports_disk_and_s3(tmp_path):
    out = tmp_path / "reads.json"
    run_bench("cache_read.py", "--text", "trimmed", "--samples", "64", "--batch-size", "8", "--workers", "1",
              "--prefetch-factor", "3", "--steps", "3", "--warmup", "1", "--json", str(out), tmp_path=tmp_path)
    rows = json.loads(out.read_text())
    assert [row["from"] for row in rows] == ["local disk", "S3 (moto, 127.0.0.1)"]
    assert all(row["rows"] == 64 and row["rows_per_s"] > 0 and 0 <= row["data_wait_pct"] < 100 for row in rows)
