"""The output lock: one writer per cache, its holder named; a stale lock (its process gone) taken over."""
from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from preprocess.output_lock import LOCK_NAME, OutputLock, OutputLocked


def _lock_of(pid, host=None, process_start=None):
    return {"pid": pid, "host": host or socket.gethostname(), "process_start": process_start or 0.0,
            "since": "2026-01-01 00:00:00 +0000", "what": "encode", "command": "flux-prep encode ...", "token": "x"}


def test_a_held_lock_refuses_a_second_writer_naming_the_first_until_released(tmp_path):
    out = tmp_path / "cache"
    first = OutputLock.acquire(out, "encode", "flux-prep encode --output cache")
    with pytest.raises(OutputLocked) as refused:
        OutputLock.acquire(out)
    message = str(refused.value)
    host = socket.gethostname()
    assert f"pid {first.holder['pid']} on {host}" in message and "flux-prep encode --output cache" in message
    assert "still running" in message and str(out / LOCK_NAME) in message
    first.release()
    assert not out.exists()                  # nothing was written: the folders the lock made are gone
    with OutputLock.acquire(out):
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == first.holder["pid"]
    assert not (out / LOCK_NAME).exists()


def test_a_lock_whose_process_is_gone_or_whose_pid_was_reused_is_taken_over(tmp_path, capsys):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    for stale in (_lock_of(gone.pid), _lock_of(subprocess.os.getpid(), process_start=12345.0)):
        (tmp_path / LOCK_NAME).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / LOCK_NAME).write_text(json.dumps(stale))
        with OutputLock.acquire(tmp_path) as lock:
            assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == lock.holder["token"]
        assert f"taking over the lock of pid {stale['pid']}" in capsys.readouterr().err


def test_a_lock_from_another_host_is_not_taken_over(tmp_path):
    (tmp_path / LOCK_NAME).parent.mkdir(parents=True)
    (tmp_path / LOCK_NAME).write_text(json.dumps(_lock_of(1, host="gpu-node-7")))
    with pytest.raises(OutputLocked, match="pid 1 on gpu-node-7.*on another host: whether it still runs cannot be "
                                           "checked from here.*if it is gone, delete"):
        OutputLock.acquire(tmp_path)
    assert json.loads((tmp_path / LOCK_NAME).read_text())["host"] == "gpu-node-7"


def test_an_object_store_lock_is_a_conditional_put(s3_bucket):
    url = f"{s3_bucket}/cache"
    with OutputLock.acquire(url) as lock:
        with pytest.raises(OutputLocked, match=f"pid {lock.holder['pid']}"):
            OutputLock.acquire(url)
    with OutputLock.acquire(url):             # released: free again
        pass
