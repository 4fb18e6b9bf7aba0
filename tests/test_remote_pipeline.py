"""encode -> kill -9 -> rerun -> verify -> train -> kill -9 -> resume, with the cache on an S3 server
(moto, 127.0.0.1) and the credentials and endpoint given only as storage options: the rows are a clean
run's, the resumed training is the uninterrupted one, and no credential is written anywhere."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from typer.testing import CliRunner

from s3_server import ACCESS_KEY, SECRET_KEY, without_s3_env
from shared.cache import CacheReader
from train_caches import read_metrics, tiny_config

REPO = Path(__file__).resolve().parent.parent


def encode_args(model, data, out, options: dict):
    return ["encode", "--model", str(model), "--input", str(Path(data) / "demo-*.tar"), "--output", str(out),
            "--resolution", "32", "--batch-size", "4", "--num-workers", "1", "--rows-per-shard", "4",
            "--device", "cpu", "--no-progress", "--storage-options", json.dumps(options)]


def rows_of(reader: CacheReader) -> dict:
    """key -> every stored value of the row, read through the reader's store."""
    rows = {}
    for shard in reader.shards:
        with reader.store.open_parquet(shard) as pf:
            for row in pf.read().to_pylist():
                assert row["key"] not in rows
                rows[row["key"]] = row
    assert len(rows) == reader.manifest["rows"]
    return rows


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    from preprocess.demo import write_demo_shards
    folder = tmp_path_factory.mktemp("demo")
    write_demo_shards(folder, num_samples=60, size=40, samples_per_shard=6, seed=0)
    return folder


def _kill_encode_after_two_inputs(args, fs, done_prefix: str) -> None:
    env = dict(without_s3_env(), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen([sys.executable, "-m", "preprocess", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        fs.invalidate_cache()
        if len(fs.glob(f"{done_prefix}/*.json")) >= 2:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"the encode ended before it could be killed: {err[-2000:]}"


def _write_trainer_config(cfg, options: dict) -> Path:
    """The user's own config file, storage options in it (to_dict() leaves their values out)."""
    tree = json.loads(json.dumps(cfg.to_dict()))
    tree["data"]["storage_options"] = options
    path = Path(cfg.run.output_dir).parent / "cfg.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(tree))
    return path


def _train_killed_and_resumed(url: str, options: dict, tmp_path: Path):
    """Training from the S3 cache through a DataLoader worker, killed while checkpointing step 4 and
    resumed, against an uninterrupted run: the same losses. Returns the killed process and the run folder."""
    from train.loop import train
    settings = {"data.num_workers": 1, "data.batch_size": 4, "run.max_steps": 6, "run.checkpoint_every": 2,
                "data.storage_options": options, "run.deterministic": True, "data.val_cache": url,
                "data.val_max_samples": 8}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as the killed process runs: the same float results
    try:
        train(tiny_config(tmp_path / "full", url, **settings))
        cut = tiny_config(tmp_path / "cut", url, **settings)
        env = dict(without_s3_env(), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        env.pop("PYTHONPATH", None)
        proc = subprocess.run([sys.executable, "tests/kill_trainer.py", "checkpoint", "4", "--config",
                               str(_write_trainer_config(cut, options))], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
        train(tiny_config(tmp_path / "cut", url, **settings, **{"run.resume": "auto"}))
    finally:
        torch.set_num_threads(threads)
    run = Path(cut.run.output_dir)

    def losses(run_dir):
        return [(m["step"], m["loss"]) for m in read_metrics(run_dir) if "loss" in m]
    assert losses(run) == losses(tmp_path / "full/run") and len(losses(run)) == 6
    return proc, run


def test_encode_kill_rerun_verify_train_kill_resume_on_s3(s3_server, s3_bucket, tiny_model, demo_data, tmp_path,
                                                          monkeypatch):
    import s3fs

    from preprocess.cli import app
    options = s3_server.options()
    for k in s3_server.env():            # this process too reaches the server only through `options`
        monkeypatch.delenv(k, raising=False)
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **options)
    url = f"{s3_bucket}/cache"

    # A clean local encode, then one to S3 killed after two inputs (and the narrowest window: an
    # input's shards uploaded, its done-record not yet), then rerun to the end.
    clean = tmp_path / "clean"
    local = [a for a in encode_args(tiny_model, demo_data, clean, {}) if a not in ("--storage-options", "{}")]
    assert CliRunner().invoke(app, local).exit_code == 0
    args = encode_args(tiny_model, demo_data, url, options)
    done_prefix = f"{url.removeprefix('s3://')}/_progress/done"
    _kill_encode_after_two_inputs(args, fs, done_prefix)
    assert not fs.exists(f"{url.removeprefix('s3://')}/manifest.json")
    records = sorted(fs.glob(f"{done_prefix}/*.json"))
    assert 2 <= len(records) < 10
    fs.rm_file(records[-1])
    monkeypatch.setattr(sys, "argv", ["flux-prep", *args])   # what the manifest records as the command
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.stderr
    assert "were done" in result.stdout and f"manifest written: {url}/manifest.json (60 rows)" in result.stdout
    remote = CacheReader(url, options)
    assert rows_of(remote) == rows_of(CacheReader(clean))
    listed = {s["path"] for s in remote.manifest["shards"]}
    assert {p.rpartition("/")[2] for p in fs.ls(url.removeprefix("s3://")) if p.endswith(".parquet")} == listed
    assert "--storage-options <not recorded>" in remote.manifest["command"]
    verified = CliRunner().invoke(app, ["verify", url, "--storage-options", json.dumps(options)])
    assert verified.exit_code == 0 and f"{url}: OK" in verified.output

    proc, run = _train_killed_and_resumed(url, options, tmp_path)

    # No credential in any object of the bucket, any file of the runs, or what the processes printed.
    written = [fs.cat_file(p) for p in fs.find(s3_bucket.removeprefix("s3://"))]
    written += [p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.name != "cfg.yaml"]
    written += [(proc.stdout + proc.stderr + result.stdout + result.stderr).encode()]
    for secret in (SECRET_KEY, ACCESS_KEY):
        assert not any(secret.encode() in blob for blob in written), f"{secret} was written"
    assert json.loads((run / "config.json").read_text())["data"]["storage_options"]["secret"] == "<not recorded>"
    assert pq.read_metadata(fs.open(f"{url.removeprefix('s3://')}/{remote.shards[0]}")).num_rows > 0
