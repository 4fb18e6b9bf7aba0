"""`flux-prep verify`: whether a cache is intact, each problem named by its shard, and warnings
about a cache that is intact but may not be what was meant (no rows, inputs that gave none);
`--repair` un-marks the inputs whose output shards are damaged, so that a rerun of the encode
encodes them again. The cache may be a folder or a URL: sizes come from one listing, checksums
from the stored bytes."""
from __future__ import annotations

import json

from shared.cache import CacheError, read_manifest
from shared.cache.keys import KeyReadError, duplicate_keys
from shared.cache.references import reference_count
from shared.cache.schema import EMPTY_PROMPT_NAME, MANIFEST_NAME, SCHEMA_VERSION, SHARD_SUFFIX, arrow_schema
from shared.cache.store import Store, open_store
from shared.family import get_family

from .ledger import DONE_FOLDER, forget, read_settings, remove_orphans
from .output_lock import OutputLock


def shard_schemas(text, mask: bool = False, references: int = 0) -> tuple:
    """The columns a shard of a family's cache may have: the family's (with the mask and ref{i}_* columns of
    a cache that has them), and with the list columns of rows of several captions (alt_captions.py)."""
    return arrow_schema(text, mask, references), arrow_schema(text, mask, references, alt=True)


def shard_problems(store: Store, entry: dict, size: int | None, schema, checksum: bool = True) -> list[str]:
    """What is wrong with one listed shard whose stored size is `size` (None: not there): missing,
    size, sha256 (`checksum`), footer, `schema` (the cache family's columns: shard_schemas), rows."""
    name = entry["path"]
    url = store.url_of(name)
    if size is None:
        return [f"{url}: missing"]
    if size != entry["bytes"]:
        return [f"{url}: {size} bytes, manifest says {entry['bytes']} (truncated or altered)"]
    try:
        if checksum and store.sha256(name) != entry["sha256"]:
            return [f"{url}: sha256 differs from the manifest (altered)"]
        pf = store.open_parquet(name)
    except Exception as e:  # pyarrow raises several types for damaged files; a store, OSErrors
        return [f"{url}: not readable as Parquet ({e})"]
    problems = []
    if not any(pf.schema_arrow.remove_metadata().equals(s) for s in schema):
        problems.append(f"{url}: columns differ from schema version {SCHEMA_VERSION}")
    version = (pf.schema_arrow.metadata or {}).get(b"flux_prep_schema_version", b"?").decode()
    if version != str(SCHEMA_VERSION):
        problems.append(f"{url}: schema version {version}, expected {SCHEMA_VERSION}")
    if pf.metadata.num_rows != entry["rows"]:
        problems.append(f"{url}: {pf.metadata.num_rows} rows, manifest says {entry['rows']}")
    return problems


def listed_shard_problems(store: Store, manifest: dict, checksum: bool) -> list[str]:
    """shard_problems of every shard the manifest lists, sizes from one listing of the cache."""
    from shared.family import family_of_manifest
    sizes = store.sizes()
    schema = shard_schemas(family_of_manifest(manifest).text, mask="mask" in manifest["dtypes"],
                           references=reference_count(manifest))
    found = store.map(lambda e: shard_problems(store, e, sizes.get(e["path"]), schema, checksum),
                      manifest["shards"])
    return [p for problems in found for p in problems]


def verify_cache(cache_dir, storage_options: dict | None = None) -> list[str]:
    """Every problem found, each naming the shard; an empty list means the cache is intact."""
    store = open_store(cache_dir, storage_options)
    try:
        manifest = read_manifest(store)
    except CacheError as e:
        return [str(e)]
    problems = listed_shard_problems(store, manifest, checksum=True)
    if not problems:
        total = sum(e["rows"] for e in manifest["shards"])
        if "rows" in manifest and total != manifest["rows"]:
            problems.append(f"{store.url}: shards hold {total} rows, manifest says {manifest['rows']}")
        try:
            problems += [f"{store.url}: {line}" for line in duplicate_keys(store, [e["path"] for e in manifest["shards"]])]
        except KeyReadError as e:
            problems.append(str(e))
    listed = {e["path"] for e in manifest["shards"]}
    owned = _outputs_of_other_inputs(store, manifest)
    for name in sorted(store.sizes()):
        if name.endswith(SHARD_SUFFIX) and name not in listed and name not in owned:
            problems.append(f"{store.url_of(name)}: shard not listed in the manifest")
    empty = manifest.get("empty_prompt", EMPTY_PROMPT_NAME)
    if not store.exists(empty):
        problems.append(f"{store.url_of(empty)}: empty-prompt encodings missing")
    if manifest.get("sample_prompts") and not store.exists(manifest["sample_prompts"]):
        problems.append(f"{store.url_of(manifest['sample_prompts'])}: sample-prompt encodings missing")
    return problems


def cache_warnings(cache_dir, storage_options: dict | None = None) -> list[str]:
    """What a readable cache holds that may surprise: no rows, inputs without rows, output shards
    of inputs that the last encode's --input did not name (kept for a later run that does)."""
    store = open_store(cache_dir, storage_options)
    try:
        manifest = read_manifest(store)
    except CacheError:
        return []
    warnings = []
    if manifest.get("rows", sum(e["rows"] for e in manifest["shards"])) == 0:
        warnings.append(f"{store.url}: the cache holds no rows")
    for item in manifest.get("inputs_without_rows", []):
        skips = ", ".join(f"{k} {v}" for k, v in sorted(item["skipped"].items())) or "no sample"
        warnings.append(f"input shard {item['id']} ({item['url']}) yielded no row ({skips})")
    listed = {e["path"] for e in manifest["shards"]}
    for name, shard_id in sorted(_outputs_of_other_inputs(store, manifest).items()):
        if name not in listed:
            warnings.append(f"{store.url_of(name)}: not in the manifest: output of input shard {shard_id}, which "
                            "the last encode's --input did not name")
    return warnings


def _outputs_of_other_inputs(store: Store, manifest: dict) -> dict[str, str]:
    """Output shard name -> input shard id, for done inputs that the manifest does not cover."""
    covered = {i["id"] for i in manifest.get("inputs_done", [])}
    names = _done_records(store)
    owned = {}
    for record in store.map(lambda n: _record(store, n), names):
        if record is not None and record.get("shard") not in covered:
            owned.update({o["path"]: record.get("shard") for o in record.get("outputs", [])})
    return owned


def _record(store: Store, name: str) -> dict | None:
    try:
        return json.loads(store.read_bytes(name))
    except (OSError, json.JSONDecodeError):
        return None


def repair_cache(cache_dir, storage_options: dict | None = None) -> dict:
    """Un-mark every done input shard one of whose output shards fails verify's checks (missing, size,
    sha256, footer, schema, rows): the manifest goes first, then its done-record, then its output
    shards, as when an input changed (ledger.py), so a rerun of the encode encodes it again and no
    key is ever held twice. A done-record that cannot be read goes the same way.

    Returns {"dropped": [{"id", "url", "problems"}], "unreadable": [record names], "command": the
    manifest's encode command or None}."""
    store = open_store(cache_dir, storage_options)
    if not _done_records(store):
        raise CacheError(f"{store.url}: no {DONE_FOLDER}/ here: not an encode's cache, or nothing of it is done; "
                         "nothing to repair")
    with OutputLock.acquire(store, "verify --repair", "flux-prep verify --repair"):   # no encode writes meanwhile
        return _repair(store)


def _done_records(store: Store) -> list[str]:
    return sorted(n for n in store.sizes(DONE_FOLDER) if n.endswith(".json"))


def _repair(store: Store) -> dict:
    names = _done_records(store)
    command = _recorded_command(store)
    records = store.map(lambda n: _record(store, n), names)
    sizes = store.sizes()
    outputs = [(rec, out) for rec in records if rec is not None for out in rec.get("outputs", [])]
    settings = read_settings(store)
    schema = shard_schemas(get_family(settings.get("family")).text, mask="mask" in settings.get("dtypes", {}),
                           references=reference_count(settings))
    found = store.map(lambda ro: shard_problems(store, ro[1], sizes.get(ro[1]["path"]), schema), outputs)
    problems: dict[str, list[str]] = {}
    for (rec, _), shard_found in zip(outputs, found):
        problems.setdefault(rec["shard"], []).extend(shard_found)
    dropped = [{"id": r["shard"], "url": r.get("url"), "problems": problems[r["shard"]]}
               for r in records if r is not None and problems.get(r["shard"])]
    unreadable = [n for n, r in zip(names, records) if r is None]
    ids = [d["id"] for d in dropped] + [n.rpartition("/")[2].removesuffix(".json") for n in unreadable]
    forget(store, ids)
    remove_orphans(store, ids)
    return {"dropped": dropped, "unreadable": unreadable, "command": command}


def _recorded_command(store: Store) -> str | None:
    """The encode command the manifest records (before a repair removes the manifest)."""
    try:
        return json.loads(store.read_bytes(MANIFEST_NAME)).get("command")
    except (OSError, ValueError, AttributeError):
        return None
