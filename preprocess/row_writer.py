"""Background threads that write encoded batches, each input shard's in order, while the main
thread keeps the device busy.

Writing a batch (waiting for its device-to-host copy, building Arrow columns, Parquet pages,
a shard's checksum and fsync at close) is CPU and disk work; on the main thread it stalls the
queueing of the next batches. Here it runs beside them. The queue is bounded so host memory
stays bounded (at most `max_pending` batches wait, one is being written). An exception in the
thread is re-raised in the main thread at its next `submit` and at `finish`; after one, the
thread writes nothing more, so the caller can abort the open shards exactly as if it had
written them itself.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable

_STOP = object()


class RowWriterThread:
    def __init__(self, write: Callable, max_pending: int = 2):
        self._write = write
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._cancelled = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cache-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is _STOP:
                return
            if self._error is not None or self._cancelled.is_set():
                continue                 # drain without writing after a failure or a cancel
            try:
                self._write(*job)
            except BaseException as e:   # noqa: BLE001 - handed to the main thread
                self._error = e

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, *job) -> None:
        """Queue a job (waits while `max_pending` jobs are queued); raises the thread's error, if any."""
        self._raise_if_failed()
        while True:
            try:
                self._queue.put(job, timeout=0.2)
                return
            except queue.Full:
                self._raise_if_failed()
                if not self._thread.is_alive():
                    raise RuntimeError("the cache writer thread died")

    def finish(self) -> None:
        """Write every queued job, stop the thread; raises the thread's error, if any."""
        self._queue.put(_STOP)
        self._thread.join()
        self._raise_if_failed()

    def cancel(self) -> None:
        """Drop queued jobs, let the one being written end, stop the thread (never raises)."""
        self._cancelled.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        try:
            self._queue.put_nowait(_STOP)
        except queue.Full:           # pragma: no cover - the queue was just emptied
            pass
        self._thread.join()


class RowWriterPool:
    """Several RowWriterThreads. Every job of one key (an input shard) goes to the same thread, so
    a shard's batches are written in order, while other shards' batches are written beside them.

    Several, because writing a large row (Parquet pages, the shard's sha256, the file write, fsync at
    the shard's end) can take as long as encoding it, and one thread then keeps the GPU waiting
    (docs/BENCHMARKS.md, run D). An error in any thread is raised at the next `submit` and at `finish`."""

    def __init__(self, write: Callable, threads: int = 2, max_pending: int = 4):
        if threads < 1:
            raise ValueError("a writer pool needs at least one thread")
        self._threads = [RowWriterThread(write, max_pending) for _ in range(threads)]
        self._thread_of: dict = {}
        self._next = 0

    def _raise_if_failed(self) -> None:
        for t in self._threads:
            t._raise_if_failed()

    def submit(self, key, *job, last: bool = False) -> None:
        """Queue a job for `key`'s thread; `last`: the key's final job (its thread is then forgotten)."""
        self._raise_if_failed()
        if key not in self._thread_of:     # keys take threads in turn, as they first appear
            self._thread_of[key] = self._threads[self._next % len(self._threads)]
            self._next += 1
        thread = self._thread_of.pop(key) if last else self._thread_of[key]
        thread.submit(*job)

    def finish(self) -> None:
        """Write every queued job and stop the threads; raises the first error, if any."""
        errors = []
        for t in self._threads:
            try:
                t.finish()
            except BaseException as e:   # noqa: BLE001 - every thread is stopped before raising
                errors.append(e)
        if errors:
            raise errors[0]

    def cancel(self) -> None:
        """Drop queued jobs in every thread, let the ones being written end (never raises)."""
        for t in self._threads:
            t.cancel()
