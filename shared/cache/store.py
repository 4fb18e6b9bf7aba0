"""Where a cache lives: a local folder, or a prefix on any fsspec file system (S3, GCS, Azure, ...).

A Store names a cache's files by their paths relative to the cache (`manifest.json`,
`_progress/done/x.json`, `x-00000.parquet`) and writes each one whole, never half:
- a local folder: a hidden temp file, fsync, rename, fsync of the folder (files.py);
- an object store: one upload per object (a PUT, or a multipart upload completed by its last
  part). An object store shows an object whole or not at all, so there is no temp key; a shard
  upload that fails is aborted (its parts discarded), and one that is killed stays an incomplete
  multipart upload, which no reader and no listing sees.
Shards become part of a cache only through the per-input-shard done-records and the manifest
(docs/remote-caches.md). Credentials and endpoints come from `storage_options` or the environment
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, ...); a Store never writes them, and
messages name files by `url_of`, built from the URL as given.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .files import TMP_SUFFIX, HashingFile, atomic_write_bytes, commit_file, sha256_file

READ_CHUNK = 8 << 20
# Requests in flight at once where a store is asked the same about many files (footers, keys,
# sizes): one at a time, 12,000 shards' footers took minutes from a bucket.
REMOTE_THREADS = 16


def is_remote(url) -> bool:
    """Whether `url` names a non-local file system (`s3://`, `gs://`, `az://`, ...)."""
    if isinstance(url, Store):
        return url.remote
    protocol, _ = _split(str(url))
    return protocol not in (None, "file", "local")


def _split(url: str) -> tuple[str | None, str]:
    import fsspec.core
    return fsspec.core.split_protocol(url)


def open_store(url, storage_options: dict | None = None) -> "Store":
    """The Store of a cache URL or folder (a Store passes through)."""
    if isinstance(url, Store):
        return url
    if is_remote(url):
        return RemoteStore(str(url), storage_options or {})
    return LocalStore(Path(_split(str(url))[1]) if "://" in str(url) else Path(url))


def parse_storage_options(text: str | None, what: str = "--storage-options") -> dict:
    """fsspec options given as a JSON object on a command line ({} for none)."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what}: not JSON ({e}); give an object such as "
                         '\'{"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}\'') from None
    if not isinstance(value, dict):
        raise ValueError(f"{what}: a JSON object of fsspec options is needed, not {type(value).__name__}")
    return value


def json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()


class Store:
    """The operations a cache needs; `name`s are relative to the cache, '/'-separated."""
    remote = False
    url: str

    def url_of(self, name: str) -> str:
        raise NotImplementedError

    def makedirs(self) -> None:
        """Make the cache's folder (object stores have none to make)."""

    def map(self, fn, items) -> list:
        """[fn(item) for item in items], several at once on a remote store."""
        items = list(items)
        if not self.remote or len(items) < 2:
            return [fn(it) for it in items]
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(min(REMOTE_THREADS, len(items))) as pool:
            return list(pool.map(fn, items))

    def read_json(self, name: str):
        return json.loads(self.read_bytes(name))

    def write_json(self, name: str, obj) -> None:
        self.write_bytes(name, json_bytes(obj))

    def __str__(self) -> str:
        return self.url


class LocalStore(Store):
    def __init__(self, root: Path):
        self.root = Path(root)
        self.url = str(self.root)

    def url_of(self, name: str) -> str:
        return str(self.root / name)

    def makedirs(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.root / name

    def exists(self, name: str) -> bool:
        return (self.root / name).is_file()

    def size(self, name: str) -> int:
        return (self.root / name).stat().st_size

    def read_bytes(self, name: str) -> bytes:
        return (self.root / name).read_bytes()

    def read_range(self, name: str, start: int, end: int) -> bytes:
        with open(self.root / name, "rb") as f:
            f.seek(start)
            return f.read(end - start)

    def open_read(self, name: str):
        return open(self.root / name, "rb")

    def open_parquet(self, name: str, **kwargs):
        import pyarrow.parquet as pq
        return pq.ParquetFile(self.root / name, **kwargs)

    def sha256(self, name: str) -> str:
        return sha256_file(self.root / name)

    def sizes(self, folder: str = "") -> dict[str, int]:
        """{name: size} of the files directly in `folder` ({} when there is no such folder)."""
        where = self.root / folder
        if not where.is_dir():
            return {}
        prefix = f"{folder}/" if folder else ""
        return {prefix + p.name: p.stat().st_size for p in where.iterdir() if p.is_file()}

    def write_bytes(self, name: str, data: bytes) -> None:
        atomic_write_bytes(self.root / name, data)   # the folders it needs are made there

    def delete(self, name: str) -> None:
        (self.root / name).unlink(missing_ok=True)

    def create(self, name: str) -> "LocalSink":
        self.root.mkdir(parents=True, exist_ok=True)
        return LocalSink(self.root / name)


class LocalSink:
    """A file being written under a hidden temp name, renamed to its own when committed."""

    def __init__(self, final: Path):
        self.final = final
        self.tmp = final.with_name(f".{final.name}.{os.getpid()}{TMP_SUFFIX}")
        self.file = HashingFile(self.tmp)

    def commit(self) -> int:
        self.file.close()
        size = self.tmp.stat().st_size   # checked before the rename: a short shard never takes its final name
        if size != self.file.size:
            raise OSError(f"{self.tmp}: {size} bytes on disk, {self.file.size} written")
        commit_file(self.tmp, self.final)
        return size

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


class RemoteStore(Store):
    """A prefix on an fsspec file system. The file system is made lazily, and again in a process
    forked from the one that made it (fsspec's async file systems are not fork-safe)."""
    remote = True

    def __init__(self, url: str, storage_options: dict):
        self.url = url.rstrip("/")
        self._options = dict(storage_options)
        self._fs = None
        self._pid = None

    def __getstate__(self):
        return {**self.__dict__, "_fs": None, "_pid": None}

    @property
    def fs(self):
        if self._fs is None or self._pid != os.getpid():
            import fsspec.core
            self._fs, self.root = fsspec.core.url_to_fs(self.url, **self._options)
            self.root = self.root.rstrip("/")
            self._pid = os.getpid()
        return self._fs

    def _path(self, name: str) -> str:
        self.fs   # sets self.root
        return f"{self.root}/{name}" if name else self.root

    def url_of(self, name: str) -> str:
        return f"{self.url}/{name}"

    def _io(self, name: str, fn, *args, **kwargs):
        """fn(...), its failure an OSError naming the object: a store's client raises its own
        types for an endpoint it cannot reach (botocore's EndpointConnectionError is no OSError)."""
        try:
            return fn(*args, **kwargs)
        except OSError:
            raise
        except Exception as e:  # noqa: BLE001 - every client's own errors, named once here
            raise OSError(f"{self.url_of(name)}: {type(e).__name__}: {e}") from e

    def exists(self, name: str) -> bool:
        return self._io(name, lambda: self.fs.isfile(self._path(name)))

    def size(self, name: str) -> int:
        return int(self._io(name, lambda: self.fs.info(self._path(name)))["size"])

    def read_bytes(self, name: str) -> bytes:
        return self._io(name, lambda: self.fs.cat_file(self._path(name)))

    def read_range(self, name: str, start: int, end: int) -> bytes:
        return self._io(name, lambda: self.fs.cat_file(self._path(name), start=start, end=end))

    def open_read(self, name: str):
        return self._io(name, lambda: self.fs.open(self._path(name), "rb"))

    def open_parquet(self, name: str, **kwargs):
        import pyarrow.parquet as pq
        return pq.ParquetFile(self.open_read(name), **kwargs)

    def sha256(self, name: str) -> str:
        """The sha256 of the stored bytes, streamed from the store."""
        def digest():
            h = hashlib.sha256()
            with self.fs.open(self._path(name), "rb", block_size=READ_CHUNK, cache_type="none") as f:
                while block := f.read(READ_CHUNK):
                    h.update(block)
            return h.hexdigest()
        return self._io(name, digest)

    def sizes(self, folder: str = "") -> dict[str, int]:
        where = self._path(folder)
        self.fs.invalidate_cache(where)     # a listing must show what is there now
        try:
            found = self._io(folder, lambda: self.fs.ls(where, detail=True))
        except FileNotFoundError:
            return {}
        prefix = f"{folder}/" if folder else ""
        return {prefix + e["name"].rstrip("/").rpartition("/")[2]: int(e.get("size") or 0)
                for e in found if e.get("type") == "file"}

    def write_bytes(self, name: str, data: bytes) -> None:
        self._io(name, lambda: self.fs.pipe_file(self._path(name), data))

    def delete(self, name: str) -> None:
        try:
            self._io(name, lambda: self.fs.rm_file(self._path(name)))
        except FileNotFoundError:
            pass

    def create(self, name: str) -> "RemoteSink":
        return RemoteSink(self, name)


class RemoteSink:
    """An object being uploaded; it exists once `commit` returns, and never if `abort` is called."""

    def __init__(self, store: RemoteStore, name: str):
        self.store, self.name = store, name
        self._raw = store.fs.open(store._path(name), "wb")
        self.file = HashingFile(None, raw=self._raw)

    def commit(self) -> int:
        self.file.close()    # completes the upload
        fs, path = self.store.fs, self.store._path(self.name)
        fs.invalidate_cache(path)
        size = int(fs.info(path)["size"])
        if size != self.file.size:
            raise OSError(f"{self.store.url_of(self.name)}: {size} bytes stored, {self.file.size} written")
        return size

    def abort(self) -> None:
        """Drop the upload: its parts are discarded, and closing the file later completes nothing."""
        try:
            self._raw.discard()
        finally:
            self._raw.closed = True
