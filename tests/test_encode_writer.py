"""The background row writer (ordered, bounded, errors handed back) and the T5 `wo` dtype
choice recorded in the cache's settings."""
from __future__ import annotations

import threading
import time

import pytest

from preprocess.decode import PrepOptions
from preprocess.encode import EncodeOptions, Encoders
from preprocess.encode_run import run_encode
from preprocess.ledger import SettingsMismatch
from preprocess.row_writer import RowWriterPool, RowWriterThread


def test_jobs_are_written_in_order_and_the_queue_is_bounded():
    written, gate = [], threading.Event()

    def write(i):
        gate.wait(5)
        written.append(i)

    w = RowWriterThread(write, max_pending=2)
    w.submit(0)                      # taken by the thread, which waits on the gate
    time.sleep(0.05)
    w.submit(1)
    w.submit(2)                      # the queue is now full
    blocked = threading.Thread(target=w.submit, args=(3,))
    blocked.start()
    blocked.join(0.3)
    assert blocked.is_alive(), "submit did not wait for room in the queue"
    gate.set()
    blocked.join(5)
    w.finish()
    assert written == [0, 1, 2, 3]


def test_an_error_is_raised_at_the_next_submit_and_nothing_more_is_written():
    written = []

    def write(i):
        if i == 1:
            raise OSError("disk full")
        written.append(i)

    w = RowWriterThread(write, max_pending=1)
    w.submit(0)
    w.submit(1)
    with pytest.raises(OSError, match="disk full"):
        for i in range(2, 100):
            w.submit(i)
            time.sleep(0.01)
    w.cancel()
    assert written == [0]


def test_an_error_in_the_last_job_is_raised_at_finish():
    def write(i):
        raise ValueError(f"bad row {i}")

    w = RowWriterThread(write)
    w.submit(7)
    with pytest.raises(ValueError, match="bad row 7"):
        w.finish()


def test_cancel_drops_queued_jobs_and_lets_the_current_one_end():
    written, gate = [], threading.Event()

    def write(i):
        gate.wait(5)
        written.append(i)

    w = RowWriterThread(write, max_pending=3)
    for i in range(4):
        w.submit(i)
    time.sleep(0.05)                            # job 0 is being written, 1-3 wait in the queue
    threading.Timer(0.2, gate.set).start()      # job 0 ends only after cancel has emptied the queue
    w.cancel()
    assert written == [0]


def test_pool_keeps_each_keys_order_and_writes_keys_side_by_side():
    written, gate, lock = [], threading.Event(), threading.Lock()

    def write(key, i):
        if key == "a":
            gate.wait(5)             # shard a's writing is slow...
        with lock:
            written.append((key, i))

    pool = RowWriterPool(write, threads=2, max_pending=8)
    for i in range(3):
        pool.submit("a", "a", i, last=i == 2)
        pool.submit("b", "b", i, last=i == 2)
    deadline = time.time() + 5
    while len(written) < 3 and time.time() < deadline:
        time.sleep(0.01)
    assert written == [("b", 0), ("b", 1), ("b", 2)]   # ...and shard b's went on beside it
    gate.set()
    pool.finish()
    assert [i for k, i in written if k == "a"] == [0, 1, 2]
    assert sorted(written) == [(k, i) for k in "ab" for i in range(3)]


def test_pool_raises_one_threads_error_at_the_next_submit_of_any_key():
    def write(key, i):
        if key == "bad":
            raise OSError("disk full")

    pool = RowWriterPool(write, threads=2)
    pool.submit("bad", "bad", 0)
    with pytest.raises(OSError, match="disk full"):
        for i in range(200):
            pool.submit("good", "good", i)
            time.sleep(0.01)
    pool.cancel()
    pool2 = RowWriterPool(write, threads=3)
    pool2.submit("good", "good", 0)
    pool2.submit("bad", "bad", 0)
    with pytest.raises(OSError, match="disk full"):
        pool2.finish()


def test_t5_wo_dtype_follows_the_option(tiny_model):
    full = Encoders(str(tiny_model), "cpu", EncodeOptions(compute_dtype="bf16"))
    kept = Encoders(str(tiny_model), "cpu", EncodeOptions(compute_dtype="bf16", text_options={"t5_fp32_wo": True}))
    assert full.text.facts()["t5_wo_dtype"] == "bfloat16"
    assert kept.text.facts()["t5_wo_dtype"] == "float32"
    assert all(p.dtype.is_floating_point and p.dtype.itemsize == 2 for p in full.text.t5.parameters())
    assert {p.dtype.itemsize for n, p in kept.text.t5.named_parameters() if ".wo." not in n} == {2}


def test_t5_wo_choice_is_recorded_and_a_different_choice_refused(tiny_model, tmp_path):
    from encode_inputs import image_bytes, write_tar
    write_tar(tmp_path / "in-00000.tar", [("a.jpg", image_bytes((40, 40))), ("a.txt", b"a red circle")])
    spec, out = str(tmp_path / "in-00000.tar"), tmp_path / "cache"

    def encode(**kw):
        return run_encode(str(tiny_model), spec, out, prep=PrepOptions(resolution=32),
                          opts=EncodeOptions(compute_dtype="bf16", **kw), batch_size=2, num_workers=0,
                          device="cpu", progress=False)

    encode()
    from shared.cache import CacheReader
    assert CacheReader(out).manifest["t5_wo_dtype"] == "bfloat16"
    with pytest.raises(SettingsMismatch, match="t5_wo_dtype"):
        encode(text_options={"t5_fp32_wo": True})
