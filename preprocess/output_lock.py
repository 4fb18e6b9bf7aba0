"""One writer at a time per cache: the lock file `_progress/lock.json` (who holds it: pid, host, the
process's start time, when, the command).

Two encodes into one folder at once both did all the work, each deleting what it took for the other's
leftovers. The second one is now refused, naming the first. The lock is taken before anything is
written or deleted, and removed when the run ends (an error and Ctrl-C included); only `kill -9` or a
crash leaves it, and a later run on the same host sees that its process is gone and takes it over.

- A local folder: the lock is written whole to a temp file and hard-linked to its name, which fails
  if the name exists (O_EXCL's guarantee, on NFS too, and a reader never sees a half-written lock).
  A lock whose holder ran on this host and is no longer running (its pid gone, or reused by a
  process started at another time) is stale and taken over.
- An object store: on S3 a conditional put (If-None-Match: *), which the store refuses if the lock
  exists; on other stores a best-effort check-then-write, said so. On another host a holder cannot be
  checked: the message says which lock object to delete if that encode is gone.

The ranks of one launch share their rank 0's lock (encode_run.py): only rank 0 takes it.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
import uuid
from pathlib import Path

import psutil

from shared.cache import CacheError
from shared.cache.store import LocalStore, Store, json_bytes, open_store

LOCK_NAME = "_progress/lock.json"


class OutputLocked(CacheError):
    """Another process is writing into this cache."""


def _holder(what: str, command: str | None) -> dict:
    """Who holds the lock. `command`: as the manifest records it (storage options left out)."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "process_start": psutil.Process().create_time(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S %z"), "what": what, "command": command or what,
            "token": uuid.uuid4().hex}


def _running_here(held: dict) -> bool | None:
    """Whether the lock's holder still runs: True/False on its own host, None elsewhere (unknowable)."""
    if held.get("host") != socket.gethostname():
        return None
    try:
        started = psutil.Process(int(held["pid"])).create_time()
    except (psutil.NoSuchProcess, KeyError, TypeError, ValueError):
        return False
    except psutil.Error:   # exists, but not ours to inspect: assume it is the holder
        return True
    # A reused pid belongs to a process started after the holder wrote its lock.
    return abs(started - float(held.get("process_start", started))) < 1.0


def _held_message(store: Store, held: dict | None) -> str:
    lock = store.url_of(LOCK_NAME)
    if held is None:
        return f"{store.url}: locked by {lock}, which cannot be read; if no encode is running, delete it and rerun"
    who = (f"{held.get('what', 'an encode')} (pid {held.get('pid')} on {held.get('host')}, since "
           f"{held.get('since')}: {held.get('command')})")
    where = {True: "still running", False: "no longer running",
             None: "on another host: whether it still runs cannot be checked from here"}[_running_here(held)]
    return (f"{store.url}: another process is writing into this cache: {who}, {where}. Wait for it to finish "
            f"(the same command then resumes from where it stopped); if it is gone, delete {lock} and rerun")


class OutputLock:
    """The lock of one cache, held by this process; `release()` (or leaving the `with`) removes it."""

    def __init__(self, store: Store, holder: dict, made: list[Path]):
        self.store, self.holder, self._made = store, holder, made

    @classmethod
    def acquire(cls, out_dir, what: str = "encode", command: str | None = None) -> "OutputLock":
        """Take the lock or raise OutputLocked naming its holder; a stale one (see module) is taken over."""
        store = open_store(out_dir)
        holder = _holder(what, command)
        made = _made_folders(store)
        try:
            for _ in range(3):   # a stale lock removed, or one that vanished while read: try again
                held = _try_create(store, holder)
                if held is None:
                    return cls(store, holder, made)
                if held == {}:   # gone between the failed create and the read
                    continue
                if held is not None and _running_here(held) is False:
                    _take_over(store, held)
                    continue
                raise OutputLocked(_held_message(store, held))
            raise OutputLocked(_held_message(store, _read(store)))
        except BaseException:
            _remove_empty(made)
            raise

    def release(self) -> None:
        """Remove the lock if it is still ours, and the folders taking it made if they are empty."""
        if (_read(self.store) or {}).get("token") == self.holder["token"]:
            self.store.delete(LOCK_NAME)
        _remove_empty(self._made)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _read(store: Store) -> dict | None:
    """The lock's holder; {} where there is no lock, None where it cannot be read."""
    try:
        held = json.loads(store.read_bytes(LOCK_NAME))
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return {}
    except (OSError, ValueError):
        return None
    return held if isinstance(held, dict) else None


def _try_create(store: Store, holder: dict) -> dict | None:
    """Create the lock: None when this process now holds it, else what holds it ({}: gone meanwhile)."""
    data = json_bytes(holder)
    if isinstance(store, LocalStore):
        path = store.path(LOCK_NAME)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
            os.link(tmp, path)   # fails if the lock exists; the lock appears whole
            return None
        except FileExistsError:
            return _read(store)
        except FileNotFoundError:   # the folder, or the temp file, removed meanwhile: try again
            return {}
        finally:
            tmp.unlink(missing_ok=True)
    return _create_remote(store, data, holder)


def _create_remote(store, data: bytes, holder: dict) -> dict | None:
    conditional = "s3" in (store.fs.protocol if isinstance(store.fs.protocol, tuple) else (store.fs.protocol,))
    try:
        if conditional:
            store._io(LOCK_NAME, lambda: store.fs.pipe_file(store._path(LOCK_NAME), data, mode="create"))
        else:
            if store.exists(LOCK_NAME):
                return _read(store)
            print(f"note: {store.url}: this store has no conditional write here: the lock is best-effort (two "
                  "encodes started within moments may both run)", file=sys.stderr, flush=True)
            store.write_bytes(LOCK_NAME, data)
    except FileExistsError:
        return _read(store)
    held = _read(store)
    return None if held and held.get("token") == holder["token"] else held


def _take_over(store: Store, held: dict) -> None:
    """Remove a stale lock, unless it changed since it was judged stale (another process took it over)."""
    print(f"note: {store.url}: taking over the lock of pid {held.get('pid')} on {held.get('host')} (since "
          f"{held.get('since')}), which is no longer running", file=sys.stderr, flush=True)
    if not isinstance(store, LocalStore):
        store.delete(LOCK_NAME)
        return
    path = store.path(LOCK_NAME)
    aside = path.with_name(f".{path.name}.stale.{os.getpid()}.tmp")
    try:
        os.replace(path, aside)     # atomic: of two processes taking it over, one moves it
    except FileNotFoundError:
        return
    try:
        if json.loads(aside.read_bytes()).get("token") != held.get("token"):
            os.link(aside, path)    # a fresh lock, not the stale one: put it back
    except (OSError, ValueError):
        pass
    finally:
        aside.unlink(missing_ok=True)


def _made_folders(store: Store) -> list[Path]:
    """The folders that taking the lock will make (local), deepest first: removed again if left empty."""
    if not isinstance(store, LocalStore):
        return []
    made, folder = [], store.path(LOCK_NAME).parent
    while not folder.exists():
        made.append(folder)
        folder = folder.parent
    return made


def _remove_empty(folders: list[Path]) -> None:
    """A run that failed before writing anything leaves no output folder behind."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:   # not empty (the run wrote into it), or gone
            return


def hold_output(out_dir, ranks, command: str | None = None) -> OutputLock | None:
    """Rank 0 takes the lock for every rank of the launch; all ranks raise OutputLocked if it could not."""
    lock, error, failure = None, None, None
    if ranks.rank == 0:
        try:
            lock = OutputLock.acquire(out_dir, "encode", command)
        except Exception as e:   # told to every rank, so that none waits at a barrier rank 0 never reaches
            failure = e
            error = str(e) if isinstance(e, OutputLocked) else f"rank 0 could not lock {out_dir}: {e}"
    error = ranks.from_rank0(error)
    if failure is not None:
        raise failure
    if error is not None:
        raise OutputLocked(error)
    return lock
