"""`flux-prep verify`: whether a cache is intact, each problem named by its shard, and warnings
about a cache that is intact but may not be what was meant (no rows, inputs that gave none)."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from shared.cache import CacheError, read_manifest, sha256_file
from shared.cache.keys import KeyReadError, duplicate_keys
from shared.cache.schema import ARROW_SCHEMA, EMPTY_PROMPT_NAME, SCHEMA_VERSION, SHARD_SUFFIX

from .progress import DONE_DIR, progress_dir


def shard_problems(path: Path, entry: dict, checksum: bool = True) -> list[str]:
    """What is wrong with one listed shard: missing, size, sha256 (`checksum`), footer, schema, rows."""
    if not path.is_file():
        return [f"{path}: missing"]
    if path.stat().st_size != entry["bytes"]:
        return [f"{path}: {path.stat().st_size} bytes, manifest says {entry['bytes']} (truncated or altered)"]
    if checksum and sha256_file(path) != entry["sha256"]:
        return [f"{path}: sha256 differs from the manifest (altered)"]
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        return [f"{path}: not readable as Parquet ({e})"]
    problems = []
    if not pf.schema_arrow.remove_metadata().equals(ARROW_SCHEMA):
        problems.append(f"{path}: columns differ from schema version {SCHEMA_VERSION}")
    version = (pf.schema_arrow.metadata or {}).get(b"flux_prep_schema_version", b"?").decode()
    if version != str(SCHEMA_VERSION):
        problems.append(f"{path}: schema version {version}, expected {SCHEMA_VERSION}")
    if pf.metadata.num_rows != entry["rows"]:
        problems.append(f"{path}: {pf.metadata.num_rows} rows, manifest says {entry['rows']}")
    return problems


def verify_cache(cache_dir) -> list[str]:
    """Every problem found, each naming the shard; an empty list means the cache is intact."""
    cache = Path(cache_dir)
    try:
        manifest = read_manifest(cache)
    except CacheError as e:
        return [str(e)]
    problems = []
    for entry in manifest["shards"]:
        problems += shard_problems(cache / entry["path"], entry)
    if not problems:
        total = sum(e["rows"] for e in manifest["shards"])
        if "rows" in manifest and total != manifest["rows"]:
            problems.append(f"{cache}: shards hold {total} rows, manifest says {manifest['rows']}")
        try:
            problems += [f"{cache}: {line}" for line in duplicate_keys(cache, [e["path"] for e in manifest["shards"]])]
        except KeyReadError as e:
            problems.append(str(e))
    listed = {e["path"] for e in manifest["shards"]}
    owned = _outputs_of_other_inputs(cache, manifest)
    for path in sorted(cache.glob(f"*{SHARD_SUFFIX}")):
        if path.name not in listed and path.name not in owned:
            problems.append(f"{path}: shard not listed in the manifest")
    empty = cache / manifest.get("empty_prompt", EMPTY_PROMPT_NAME)
    if not empty.is_file():
        problems.append(f"{empty}: empty-prompt encodings missing")
    return problems


def cache_warnings(cache_dir) -> list[str]:
    """What a readable cache holds that may surprise: no rows, inputs without rows, output shards
    of inputs that the last encode's --input did not name (kept for a later run that does)."""
    cache = Path(cache_dir)
    try:
        manifest = read_manifest(cache)
    except CacheError:
        return []
    warnings = []
    if manifest.get("rows", sum(e["rows"] for e in manifest["shards"])) == 0:
        warnings.append(f"{cache}: the cache holds no rows")
    for item in manifest.get("inputs_without_rows", []):
        skips = ", ".join(f"{k} {v}" for k, v in sorted(item["skipped"].items())) or "no sample"
        warnings.append(f"input shard {item['id']} ({item['url']}) yielded no row ({skips})")
    listed = {e["path"] for e in manifest["shards"]}
    for name, shard_id in sorted(_outputs_of_other_inputs(cache, manifest).items()):
        if name not in listed:
            warnings.append(f"{cache / name}: not in the manifest: output of input shard {shard_id}, which the "
                            "last encode's --input did not name")
    return warnings


def _outputs_of_other_inputs(cache: Path, manifest: dict) -> dict[str, str]:
    """Output shard name -> input shard id, for done inputs that the manifest does not cover."""
    covered = {i["id"] for i in manifest.get("inputs_done", [])}
    owned = {}
    folder = progress_dir(cache) / DONE_DIR
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if record.get("shard") not in covered:
            owned.update({o["path"]: record.get("shard") for o in record.get("outputs", [])})
    return owned
