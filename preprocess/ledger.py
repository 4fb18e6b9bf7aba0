"""The resume ledger (the cache's `_progress/` folder): the run's settings, one done-record per input
shard, orphan cleanup, and the manifest built from the done-records of the shards the current
--input names.

Exactly-once rests on one order of writes: an input shard's output shards are complete in
place first (renamed into place, or uploaded whole), its done-record is written (atomically)
last. A shard without a done-record is not done, whatever files it left behind; a rerun deletes
those files and encodes the shard again. Output names derive from the input shard's id, so every
rank of every run knows which leftovers are its own, whatever the number of processes.

A done-record keeps the input's fingerprint (size and mtime, or etag): an input replaced
since (a download completed, a broken file fixed) is encoded again, its old rows removed
first: the manifest goes, then the done-record, so a kill at any moment leaves a shard
that is simply not done. So is an input whose recorded output shards a listing shows missing or
of another size (deleted, truncated); altered bytes of the same size take a checksum to see:
`flux-prep verify --repair` (verify.py) un-marks their inputs the same way.
"""
from __future__ import annotations

import json
import re

from shared.cache import CacheError, cache_manifest, write_manifest
from shared.cache.references import REFERENCES_KEY
from shared.cache.sample_prompts import SAMPLE_PROMPTS_NAME
from shared.cache.schema import EMPTY_PROMPT_NAME, MANIFEST_NAME
from shared.cache.store import Store, open_store
from shared.text_float8 import TEXT_PRECISION_KEY, recorded_precision

from .sources import SKIP_EXAMPLES, InputError, InputShard

PROGRESS_DIR = "_progress"
SETTINGS_NAME = "settings.json"
DONE_DIR = "done"
# 2: input-shard ids from the shard alone (folder/name), done-records with fingerprints. Version 1
# ids depended on the whole --input spec, so its records cannot be matched to this run's shards.
PROGRESS_VERSION = 2
# What must match between runs writing into one cache: every setting but the ledger's version and those
# the family records only (its `settings_only`). Anything not in the settings (batch size, workers, rows per
# shard, device) may change across a resume.
NOT_COMPARED = ("progress_version",)


class SettingsMismatch(Exception):
    """A rerun into an existing cache with other encoders or preparation options."""


SETTINGS_FILE = f"{PROGRESS_DIR}/{SETTINGS_NAME}"
DONE_FOLDER = f"{PROGRESS_DIR}/{DONE_DIR}"


def done_name(shard_id: str) -> str:
    """The done-record of an input shard, relative to the cache."""
    return f"{DONE_FOLDER}/{shard_id}.json"


def _read_json(store: Store, name: str):
    """A small JSON file, or None where there is none (one request on an object store)."""
    try:
        return json.loads(store.read_bytes(name))
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


def _comparable(settings: dict, keys: list[str]) -> dict:
    """Encoders compare by weight hash (a moved folder is the same model), else by source."""
    from shared.family import DEFAULT_FAMILY
    out = {k: settings.get(k) for k in keys}
    out["family"] = out.get("family") or DEFAULT_FAMILY   # settings written before families had names
    if TEXT_PRECISION_KEY in out:   # recorded for fp8 only: a cache without it is bf16's
        out[TEXT_PRECISION_KEY] = recorded_precision(settings)
    out["encoders"] = {part: (ident.get("sha256") or ident.get("source"))
                       for part, ident in (settings.get("encoders") or {}).items()}
    return out


def check_progress_version(out_dir) -> None:
    """Refuse a cache folder whose done-records an older flux-prep wrote (before anything is changed)."""
    settings = _read_json(open_store(out_dir), SETTINGS_FILE)
    if settings is not None and settings.get("progress_version") != PROGRESS_VERSION:
        raise SettingsMismatch(f"{out_dir} was written by an older flux-prep, whose input-shard ids depended "
                               "on the whole --input spec; encode into a new --output folder")


def check_or_write_settings(out_dir, settings: dict) -> None:
    """Record the run's settings on the first run; refuse a later run whose settings differ."""
    store = open_store(out_dir)
    old = _read_json(store, SETTINGS_FILE)
    if old is not None:
        from shared.family import get_family
        skip = NOT_COMPARED + get_family(settings.get("family")).settings_only
        keys = [k for k in dict.fromkeys([*settings, *old]) if k not in skip]
        a, b = _comparable(old, keys), _comparable(settings, keys)
        diffs = [f"{k}: cache has {json.dumps(a[k], sort_keys=True)}, this run {json.dumps(b[k], sort_keys=True)}"
                 for k in keys if a[k] != b[k]]
        if diffs:
            raise SettingsMismatch(
                f"{out_dir} was encoded with other settings; refusing to mix caches ("
                + "; ".join(diffs) + "). Use a new --output folder, or rerun with the cache's settings.")
        return
    store.write_json(SETTINGS_FILE, {**settings, "progress_version": PROGRESS_VERSION})


def read_settings(out_dir) -> dict:
    return open_store(out_dir).read_json(SETTINGS_FILE)


def read_record(out_dir, shard_id: str) -> dict | None:
    """An input shard's done-record, read by its path (no folder listing: listings may be cached)."""
    return _read_json(open_store(out_dir), done_name(shard_id))


def read_records(out_dir, shard_ids: list[str]) -> list[dict | None]:
    """The done-records of these input shards (None where there is none), several at once remotely."""
    store = open_store(out_dir)
    return store.map(lambda shard_id: read_record(store, shard_id), shard_ids)


def write_done(out_dir, shard: InputShard, record: dict) -> None:
    """Mark `shard` done: `record` holds its outputs, rows and skips; its identity is added here."""
    identity = {"shard": shard.id, "url": shard.url, "fingerprint": shard.fingerprint}
    if shard.content() is not None:
        identity["content"] = shard.content()
    open_store(out_dir).write_json(done_name(shard.id), {**identity, **record})


def plan_shards(out_dir, shards: list[InputShard]) -> tuple[list[InputShard], list[tuple[InputShard, str]]]:
    """(the shards to encode, (shard, message) for each done shard to encode again: its input changed
    since, or its output shards are missing or of another size than recorded).

    A folder shard whose sample list changed is refused, since its id is a position in the folder's
    sorted file list (every later shard moved too)."""
    todo, changed = [], []
    sizes = None   # the cache's listing, made once a done shard needs it
    for shard, rec in zip(shards, read_records(out_dir, [s.id for s in shards])):
        if rec is None:
            todo.append(shard)
            continue
        if rec.get("content") != shard.content():
            raise InputError(f"input shard {shard.id} holds other samples than when it was encoded into {out_dir} "
                             "(files added or removed?); encode into a new output folder")
        if rec.get("fingerprint") != shard.fingerprint:
            why = (f"changed since it was encoded ({_describe(rec.get('fingerprint'))} -> "
                   f"{_describe(shard.fingerprint)})")
        else:
            sizes = open_store(out_dir).sizes() if sizes is None else sizes
            damage = output_damage(rec, sizes)
            if not damage:
                continue
            why = "has damaged output shards (" + "; ".join(damage) + ")"
        changed.append((shard, f"input shard {shard.id} ({shard.url}) {why}: encoding it again, its old rows removed"))
        todo.append(shard)
    return todo, changed


def output_damage(record: dict, sizes: dict[str, int]) -> list[str]:
    """What a listing of the cache ({name: size}) shows wrong with a done-record's output shards."""
    damage = []
    for out in record.get("outputs", []):
        size = sizes.get(out["path"])
        if size is None:
            damage.append(f"{out['path']} missing")
        elif size != out["bytes"]:
            damage.append(f"{out['path']} is {size} bytes, recorded {out['bytes']}")
    return damage


def _describe(fingerprint: dict | None) -> str:
    return ", ".join(f"{k} {v}" for k, v in (fingerprint or {}).items()) or "no fingerprint"


def forget(out_dir, shard_ids: list[str]) -> None:
    """Un-mark done shards: the manifest first (it lists their rows), then their done-records;
    their output shards are then orphans that `remove_orphans` deletes."""
    if not shard_ids:
        return
    store = open_store(out_dir)
    store.delete(MANIFEST_NAME)
    for shard_id in shard_ids:
        store.delete(done_name(shard_id))


def output_pattern(shard_id: str) -> re.Pattern:
    """Files an input shard's encoding may leave: its output shards and their temp files."""
    sid = re.escape(shard_id)
    return re.compile(rf"^(\.)?{sid}-\d{{5}}\.parquet(\.\d+\.tmp)?$")


def remove_orphans(out_dir, shard_ids: list[str]) -> list[str]:
    """Delete output shards and temp files of the given input shards (none of them done)."""
    store = open_store(out_dir)
    removed = []
    if shard_ids:
        patterns = [output_pattern(s) for s in shard_ids]
        for name in store.sizes():
            if any(pat.match(name) for pat in patterns):
                store.delete(name)
                removed.append(name)
    return removed


def sweep_temps(out_dir) -> list[str]:
    """Delete every temp file of an atomic write (`.NAME.PID.tmp`) in the cache's folders (an
    object store has none: its objects are uploaded whole).

    Only safe while no process of this run has written anything: the encode calls it on rank 0
    before the ranks' first barrier, so whatever it finds was left by a killed earlier run."""
    store = open_store(out_dir)
    removed = []
    for folder in ("", PROGRESS_DIR, DONE_FOLDER):
        for name in store.sizes(folder):
            base = name.rpartition("/")[2]
            if base.startswith(".") and base.endswith(".tmp"):
                store.delete(name)
                removed.append(base)
    return removed


def manifest_of_records(out_dir, records: list[dict], command: str, version: str) -> dict:
    """The manifest covering the given done-records (the current --input's shards, in its order)."""
    from shared.family import get_family
    settings = read_settings(out_dir)
    family = get_family(settings.get("family"))
    shards, skipped, examples, rows = [], {}, {}, 0
    for rec in records:
        shards += rec["outputs"]
        rows += rec["rows"]
        for reason, n in rec["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
        for reason, names in rec.get("skipped_examples", {}).items():   # older records have none
            kept = examples.setdefault(reason, [])
            kept += names[:SKIP_EXAMPLES - len(kept)]
    return cache_manifest(
        family=family, dtypes=settings["dtypes"], dims=settings["dims"], text=settings[family.text.states],
        shards=shards, rows=rows, skipped=skipped, empty_prompt=EMPTY_PROMPT_NAME, encoders=settings["encoders"],
        vae=settings["vae"], image=settings["image"], compute_dtype=settings["compute_dtype"],
        **({REFERENCES_KEY: settings[REFERENCES_KEY]} if settings.get(REFERENCES_KEY) else {}),
        **({TEXT_PRECISION_KEY: settings[TEXT_PRECISION_KEY]} if settings.get(TEXT_PRECISION_KEY) else {}),
        **{k: settings.get(k) for k in family.manifest_facts},
        # The first SKIP_EXAMPLES skipped samples of each reason, named (sources.skipped_name).
        skipped_examples=dict(sorted(examples.items())),
        inputs_done=[{"id": r["shard"], "url": r["url"], "rows": r["rows"]} for r in records],
        # Inputs that yielded no row (unreadable, empty, every sample skipped), named with their skips.
        inputs_without_rows=[{"id": r["shard"], "url": r["url"], "skipped": r["skipped"]}
                             for r in records if r["rows"] == 0],
        command=command, version=version,
        # Rows of several captions, a prefix, variants (captions.py): said only where there are any.
        **({"captions": captions} if (captions := caption_summary(settings, records)) else {}),
        # encode --sample-prompts wrote them (with the same T5 settings, which a rerun cannot change)
        **({"sample_prompts": SAMPLE_PROMPTS_NAME} if open_store(out_dir).exists(SAMPLE_PROMPTS_NAME) else {}))


def caption_summary(settings: dict, records: list[dict]) -> dict | None:
    """The manifest's `captions`: captions per row (max, rows with several, total) and the settings'
    prefix and variants; None for a cache of one caption a row without them (as before)."""
    counted = [r["captions"] for r in records if r.get("captions")]
    if not counted and not settings.get("captions"):
        return None
    several = sum(c["rows_with_several"] for c in counted)
    total = sum(c["total"] for c in counted) + sum(r["rows"] for r in records if not r.get("captions"))
    return {"max": max([c["max"] for c in counted], default=1), "rows_with_several": several, "total": total,
            **(settings.get("captions") or {})}


def kept_progress(out_dir, shards: list[InputShard]) -> dict:
    """What the done-records of these input shards keep: shards done, their rows and output shards."""
    records = [r for r in read_records(out_dir, [s.id for s in shards]) if r is not None]
    return {"done": len(records), "total": len(shards), "rows": sum(r.get("rows", 0) for r in records),
            "outputs": sum(len(r.get("outputs", [])) for r in records)}


def write_cache_manifest(out_dir, shards: list[InputShard], command: str, version: str) -> dict:
    """Write the manifest of this run's input shards, every one of them done; returns it.
    Raises InputError naming the shards without a done-record."""
    records = read_records(out_dir, [s.id for s in shards])
    missing = [s.id for s, r in zip(shards, records) if r is None]
    if missing:
        raise InputError(f"{out_dir}: no manifest written: input shards not done: {', '.join(missing[:5])}"
                         + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    manifest = manifest_of_records(out_dir, records, command, version)
    try:
        write_manifest(out_dir, manifest)
    except CacheError as e:   # an output shard damaged after its input was done: its keys cannot be read
        raise CacheError(f"{e}. `flux-prep verify --repair {out_dir}` finds the damaged shards and un-marks "
                         "their inputs; then rerun this command to encode them again") from None
    return manifest
