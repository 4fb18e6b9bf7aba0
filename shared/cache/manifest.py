"""manifest.json: what a cache holds and how it was made."""
from __future__ import annotations

import json
import os

from .keys import KeyReadError, duplicate_keys
from .schema import EMPTY_PROMPT_NAME, MANIFEST_NAME, SCHEMA_VERSION
from .store import open_store


class CacheError(Exception):
    """A cache that cannot be used as asked: missing, altered, or of another kind."""


def read_manifest(cache_dir, storage_options: dict | None = None) -> dict:
    """The manifest of a cache (a folder, a URL or a Store), checked for what every reader needs."""
    store = open_store(cache_dir, storage_options)
    path = store.url_of(MANIFEST_NAME)
    try:
        data = store.read_bytes(MANIFEST_NAME)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        where = "" if store.remote or os.path.isabs(store.url) else f" (from {os.getcwd()})"
        raise CacheError(f"{store.url}{where}: no {MANIFEST_NAME}; not a flux-prep cache, or its encode has not "
                         "finished") from None
    except OSError as e:   # a store that cannot be reached, or refuses the credentials
        raise CacheError(f"{path}: unreadable ({e})") from None
    try:
        manifest = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheError(f"{path}: not valid JSON ({e})") from None
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise CacheError(f"{path}: cache schema version {version!r}, this flux-prep reads version {SCHEMA_VERSION}")
    from ..family import family_of_manifest
    try:
        spec = family_of_manifest(manifest).text
    except ValueError as e:
        raise CacheError(f"{path}: {e}") from None
    for field in ("shards", "dtypes", "dims", spec.states):
        if field not in manifest:
            raise CacheError(f"{path}: manifest has no {field!r}")
    if manifest[spec.states].get("mode") not in spec.modes:
        raise CacheError(f"{path}: unknown {spec.label} mode {manifest[spec.states].get('mode')!r}")
    return manifest


def cache_manifest(*, family, dtypes: dict, dims: dict, text: dict, shards: list, rows: int | None = None,
                   skipped: dict | None = None, empty_prompt: str = EMPTY_PROMPT_NAME, **facts) -> dict:
    """The one builder of a manifest's fields (DESIGN.md, the cache contract), for write_manifest:
    `family` (shared/family/) whose text columns the shards hold, `dtypes` per tensor column, `dims`
    (latent_channels and the text columns' widths, e.g. t5_dim, clip_dim), `text` (mode, max_length;
    under the text states' column name: "t5" for FLUX.1), `shards` (ShardInfo or their dicts), `rows` (their
    sum unless given), skip counts by reason (sorted), the empty prompt's file; `facts` (encoders, vae,
    image, command, ...) follow in the order given."""
    spec = family.text
    if text.get("mode") not in spec.modes:
        raise ValueError(f"unknown {spec.label} mode {text.get('mode')!r}; choose one of {', '.join(spec.modes)}")
    shards = [s if isinstance(s, dict) else s.to_dict() for s in shards]
    return {"family": family.name, "dtypes": dtypes, "dims": dims, spec.states: text, "shards": shards,
            "rows": sum(s["rows"] for s in shards) if rows is None else rows,
            "skipped": dict(sorted((skipped or {}).items())), "empty_prompt": empty_prompt, **facts}


def write_manifest(cache_dir, manifest: dict) -> None:
    """Write manifest.json, refusing shards that hold a key twice (a cache's keys are unique)."""
    store = open_store(cache_dir)
    try:
        repeated = duplicate_keys(store, [s["path"] for s in manifest["shards"]])
    except KeyReadError as e:
        raise CacheError(f"{store.url}: refusing to write the manifest: {e}") from None
    if repeated:
        raise CacheError(f"{store.url}: refusing to write a manifest whose shards repeat keys: " + "; ".join(repeated))
    store.write_json(MANIFEST_NAME, {"schema_version": SCHEMA_VERSION, **manifest})


def check_text_mode(manifest: dict, expected_mode: str | None, where: str = "cache") -> None:
    """Refuse a cache whose text convention differs from what the caller was configured for."""
    from ..family import family_of_manifest
    spec = family_of_manifest(manifest).text
    mode = spec.settings(manifest)["mode"]
    if expected_mode is not None and mode != expected_mode:
        raise CacheError(f"{where} was encoded with {spec.label} mode {mode!r} but {expected_mode!r} is expected")
