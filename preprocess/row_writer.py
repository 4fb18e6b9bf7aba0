"""One background thread that writes encoded batches, in order, while the main thread keeps
the device busy.

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
