"""Real `flux-prep encode` processes: kill -9 partway and rerun, and two processes at once, each
ending with exactly the rows of one clean run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from preprocess.output_lock import LOCK_NAME
from shared.cache import CacheReader
from shared.cache.schema import arrow_schema
from shared.family.flux1 import FLUX1

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONUNBUFFERED": "1"}


def encode_args(model, data, out, *extra):
    return ["encode", "--model", str(model), "--input", str(Path(data) / "demo-*.tar"), "--output", str(out),
            "--resolution", "32", "--batch-size", "4", "--num-workers", "1", "--rows-per-shard", "5",
            "--device", "cpu", "--no-progress", *extra]


def run_cli(args, timeout=300):
    proc = subprocess.run([sys.executable, "-m", "preprocess", *args], env=ENV, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def kill_encode_after_two_inputs(args, done_dir) -> None:
    """Start `flux-prep encode ARGS` in a process of its own and kill -9 it once two inputs are done."""
    proc = subprocess.Popen([sys.executable, "-m", "preprocess", *args], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if done_dir.is_dir() and len(list(done_dir.glob("*.json"))) >= 2:
            break
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the encode finished before it could be killed"


def raw_rows(cache) -> dict:
    """key -> the row's stored bytes (every tensor column and the scalars), read straight from Parquet."""
    import pyarrow.parquet as pq
    reader = CacheReader(cache)
    rows = {}
    for shard in reader.shards:
        table = pq.read_table(Path(cache) / shard)
        for row in table.to_pylist():
            assert row["key"] not in rows, f"duplicate row {row['key']}"
            rows[row["key"]] = row
    assert len(rows) == reader.manifest["rows"]
    listed = {s["path"] for s in reader.manifest["shards"]}
    on_disk = {p.name for p in Path(cache).glob("*.parquet")}
    assert on_disk == listed, f"unlisted shards: {on_disk - listed}"
    assert not list(Path(cache).rglob("*.tmp")), "temp files left behind"
    return rows


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    from preprocess.demo import write_demo_shards
    folder = tmp_path_factory.mktemp("demo")
    write_demo_shards(folder, num_samples=360, size=40, samples_per_shard=12, seed=0)
    return folder


@pytest.fixture(scope="module")
def clean_run(tiny_model, demo_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "cache"
    run_cli(encode_args(tiny_model, demo_data, out))
    return out


def test_kill_9_then_rerun_gives_the_clean_rows(tiny_model, demo_data, clean_run, tmp_path):
    out = tmp_path / "cache"
    done_dir = out / "_progress" / "done"
    kill_encode_after_two_inputs(encode_args(tiny_model, demo_data, out), done_dir)
    assert not (out / "manifest.json").exists()
    records = sorted(done_dir.glob("*.json"))
    assert 2 <= len(records) < 30
    # Also the narrowest window: output shards renamed into place, done-record not yet written.
    records[-1].unlink()

    proc = run_cli(encode_args(tiny_model, demo_data, out))
    assert "were done" in proc.stdout
    assert "taking over the lock of pid" in proc.stderr   # the killed run's, stale: its process is gone
    assert raw_rows(out) == raw_rows(clean_run)
    assert CacheReader(out).manifest["rows"] == 360
    assert not (out / LOCK_NAME).exists()


def _resume_from(clean, out, shard_ids) -> None:
    """Make `out` a cache in which the given input shards are done: the clean run's settings,
    done-records and output shards for them (ids and fingerprints do not depend on the output folder)."""
    import shutil
    (out / "_progress" / "done").mkdir(parents=True)
    shutil.copy(clean / "_progress" / "settings.json", out / "_progress" / "settings.json")
    shutil.copy(clean / "empty_prompt.safetensors", out / "empty_prompt.safetensors")
    for shard_id in shard_ids:
        shutil.copy(clean / "_progress" / "done" / f"{shard_id}.json", out / "_progress" / "done")
        for p in clean.glob(f"{shard_id}-*.parquet"):
            shutil.copy(p, out / p.name)


def test_two_processes_equal_one(tiny_model, demo_data, clean_run, tmp_path):
    """Rank 0's shards (every other one) are done already, so rank 0 reaches the end long before rank 1:
    it waits at the barrier and then writes the manifest (it used to rely on being the last to finish
    and seeing every done-record in a listing). Temp files of a killed earlier run are swept."""
    out = tmp_path / "cache"
    ids = [r["id"] for r in CacheReader(clean_run).manifest["inputs_done"]]
    _resume_from(clean_run, out, ids[0::2])
    stale = [out / "_progress" / "done" / f".{ids[1]}.json.99999.tmp", out / f".{ids[1]}-00000.parquet.99999.tmp"]
    for p in stale:
        p.write_bytes(b"left by a killed run")
    # accelerate's --cpu launcher starts a single process; --multi_gpu starts torchrun's N
    # processes, which on a machine without GPUs run on the CPU (--device cpu).
    cmd = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
           "-m", "preprocess", *encode_args(tiny_model, demo_data, out)]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0/2: 0 rows, 0 skipped, 0 input shards encoded (15 were done" in proc.stdout
    assert "rank 1/2: 180 rows" in proc.stdout
    assert proc.stdout.count("manifest written") == 1   # by rank 0, which finished first
    assert f"rank 0/2: manifest written: {out / 'manifest.json'} (360 rows)" in proc.stdout
    assert not any(p.exists() for p in stale)
    assert not (out / LOCK_NAME).exists()               # rank 0 took it for both ranks, and released it
    rows = raw_rows(out)
    clean = raw_rows(clean_run)
    assert rows.keys() == clean.keys()
    for key, row in rows.items():
        for col in arrow_schema(FLUX1.text).names:   # every column of the contract
            assert row[col] == clean[key][col], (key, col)
    m = CacheReader(out).manifest
    assert len(m["inputs_done"]) == 30 and m["rows"] == 360


def test_ctrl_c_says_what_was_kept_exits_130_and_a_rerun_resumes(tiny_model, demo_data, clean_run, tmp_path):
    """SIGINT (a terminal's Ctrl-C) partway: exit 130 and a message counting the done input shards it keeps
    (as many as there are done-records), saying that the same command resumes; it does, exactly."""
    out = tmp_path / "cache"
    done_dir = out / "_progress" / "done"
    proc = subprocess.Popen([sys.executable, "-m", "preprocess", *encode_args(tiny_model, demo_data, out)],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if done_dir.is_dir() and len(list(done_dir.glob("*.json"))) >= 2:
            break
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    done = len(list(done_dir.glob("*.json")))
    assert 2 <= done < 30
    assert f"interrupted: kept {done} of 30 input shards done in {out}" in err
    assert f"the other {30 - done} (those being encoded included) are not done" in err
    assert "rerun the same command to resume" in err and "Traceback" not in err
    assert not list(out.rglob("*.tmp")), "the interrupted shards' temp files are removed"
    rerun = run_cli(encode_args(tiny_model, demo_data, out))
    assert f"{done} were done" in rerun.stdout
    assert raw_rows(out) == raw_rows(clean_run)


def test_a_second_encode_into_the_same_folder_is_refused_naming_the_first(tiny_model, demo_data, clean_run, tmp_path):
    """Two encodes at once into one folder used to both do all the work. The second is refused at once,
    naming the first (pid, host, since when), and changes nothing: the first ends with the clean rows."""
    import socket
    out = tmp_path / "cache"
    first = subprocess.Popen([sys.executable, "-m", "preprocess", *encode_args(tiny_model, demo_data, out)],
                             env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while first.poll() is None and not (out / LOCK_NAME).exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(first.pid, signal.SIGSTOP)   # held mid-run, however fast this machine encodes
    try:
        second = subprocess.run([sys.executable, "-m", "preprocess", *encode_args(tiny_model, demo_data, out)],
                                env=ENV, capture_output=True, text=True, timeout=300)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert second.returncode == 2, second.stderr[-3000:]
    assert f"another process is writing into this cache: encode (pid {first.pid} on {socket.gethostname()}" \
        in second.stderr
    assert "still running" in second.stderr and "rows" not in second.stdout
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    assert raw_rows(out) == raw_rows(clean_run)
    assert not (out / LOCK_NAME).exists()
