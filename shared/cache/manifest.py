"""manifest.json: what a cache holds and how it was made."""
from __future__ import annotations

import json
from pathlib import Path

from .files import atomic_write_json
from .keys import KeyReadError, duplicate_keys
from .schema import MANIFEST_NAME, SCHEMA_VERSION, T5_MODES


class CacheError(Exception):
    """A cache that cannot be used as asked: missing, altered, or of another kind."""


def manifest_path(cache_dir) -> Path:
    return Path(cache_dir) / MANIFEST_NAME


def read_manifest(cache_dir) -> dict:
    path = manifest_path(cache_dir)
    if not path.is_file():
        raise CacheError(f"{cache_dir}: no {MANIFEST_NAME}; not a flux-prep cache, or its encode has not finished")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CacheError(f"{path}: not valid JSON ({e})") from None
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise CacheError(f"{path}: cache schema version {version!r}, this flux-prep reads version {SCHEMA_VERSION}")
    for field in ("shards", "dtypes", "dims", "t5"):
        if field not in manifest:
            raise CacheError(f"{path}: manifest has no {field!r}")
    if manifest["t5"].get("mode") not in T5_MODES:
        raise CacheError(f"{path}: unknown T5 mode {manifest['t5'].get('mode')!r}")
    return manifest


def write_manifest(cache_dir, manifest: dict) -> None:
    """Write manifest.json, refusing shards that hold a key twice (a cache's keys are unique)."""
    try:
        repeated = duplicate_keys(cache_dir, [s["path"] for s in manifest["shards"]])
    except KeyReadError as e:
        raise CacheError(f"{cache_dir}: refusing to write the manifest: {e}") from None
    if repeated:
        raise CacheError(f"{cache_dir}: refusing to write a manifest whose shards repeat keys: " + "; ".join(repeated))
    manifest = {"schema_version": SCHEMA_VERSION, **manifest}
    atomic_write_json(manifest_path(cache_dir), manifest)


def check_t5_mode(manifest: dict, expected_mode: str | None, where: str = "cache") -> None:
    """Refuse a cache whose T5 convention differs from what the caller was configured for."""
    mode = manifest["t5"]["mode"]
    if expected_mode is not None and mode != expected_mode:
        raise CacheError(f"{where} was encoded with T5 mode {mode!r} but {expected_mode!r} is expected")
