"""One rank's encode run: its input shards -> output shards + done-records; once every rank is
done, rank 0 writes the manifest. See ledger.py (the resume ledger) for why a kill at any moment is harmless.

Nothing is written before the inputs and the model folder are known to exist, and the first
file written (the run's settings) waits until the encoders have loaded."""
from __future__ import annotations

import sys
import time
from dataclasses import replace

from safetensors.torch import save as save_safetensors
from torch.utils.data import DataLoader

from shared.cache import CacheError
from shared.cache.references import REFERENCES_KEY
from shared.cache.schema import EMPTY_PROMPT_NAME, MANIFEST_NAME
from shared.cache.store import Store, open_store
from shared.devices import resolve_device
from shared.precision import canonical_dtype
from shared.text_float8 import TEXT_PRECISION_KEY, check_text_precision

from .captions import CaptionOptions
from .decode import PrepOptions, ShardBatches, worker_init
from .encode import EncodeOptions, Encoders, check_model
from .encode_bar import EncodeBar
from .masks import MASK_DTYPE, MASK_RULE
from .ledger import (check_or_write_settings, check_progress_version, forget, plan_shards, remove_orphans,
                       sweep_temps, write_cache_manifest)
from .output_lock import hold_output
from .ranks import Ranks
from .row_writer import RowWriterPool
from .shard_output import ShardOutputs
from .sources import InputShard, resolve_inputs

CROP_RULE = "resize short side to target (ceil), center crop"


def run_settings(enc: Encoders, prep: PrepOptions, opts: EncodeOptions,
                 captions: CaptionOptions = CaptionOptions()) -> dict:
    """What the cache's `_progress/settings.json` records, and a rerun must match (ledger.py); the
    text section and the encoder's own facts are the family's (FLUX.1: "t5", t5_wo_dtype, t5_impl);
    a caption prefix or variants (captions.py) and a float8 text encoder (`text_precision`) only where set."""
    store = canonical_dtype(opts.dtype)
    spec = enc.text_spec
    dtypes = {"latent": store, **{c: store for c in spec.tensor_columns}}
    if opts.store_logvar:
        dtypes["latent_logvar"] = store
    if prep.masks:   # without --masks the settings (and the manifest) are what they always were
        dtypes["mask"] = MASK_DTYPE
    image = {"resolution": prep.resolution, "buckets": prep.bucket_list(), "crop": CROP_RULE,
             "min_size": prep.min_size, "jpeg_draft": prep.jpeg_draft, **({"masks": MASK_RULE} if prep.masks else {})}
    if prep.references:    # only then: a plain cache's settings (and manifest) stay as they were
        image["reference_resolution"] = prep.reference_resolution
    return {
        "family": enc.family.name,
        "encoders": enc.identities,
        **({REFERENCES_KEY: prep.references} if prep.references else {}),
        "image": image,
        spec.states: {"mode": opts.text_mode, "max_length": enc.text.max_length},
        "dtypes": dtypes, "compute_dtype": enc.compute_dtype_name, **enc.text.facts(),
        "dims": enc.dims(), "vae": enc.vae_factors(),
        **({"captions": captions.settings()} if captions.settings() else {}),
        **({TEXT_PRECISION_KEY: opts.text_precision} if opts.text_precision != "bf16" else {}),
    }


def run_encode(model: str, input_spec: str, output, *, prep: PrepOptions, opts: EncodeOptions,
               batch_size: int = 64, num_workers: int = 4, rows_per_shard: int = 1000,
               device: str | None = None, command: str | None = None, progress: bool = True,
               writer_threads: int = 2, storage_options: dict | None = None,
               captions: CaptionOptions = CaptionOptions()) -> dict:
    """Encode this rank's share of the input shards; returns a summary for this rank.
    `output`: a folder or a URL (`storage_options` for its file system). `writer_threads`: threads
    writing output shards, each input shard's rows by one thread. `captions`: a prefix and tag-shuffled
    variants (captions.py)."""
    out_dir = open_store(output, storage_options)
    ranks = Ranks()
    device = resolve_device(device, ranks.local_rank)
    check_text_precision(opts.text_precision, device)   # before the output is locked or written
    shards = resolve_inputs(input_spec, references=prep.references)
    family = check_model(model)
    family.check_references(prep.references, "--references")   # Kontext places one: refused before any work
    prep = replace(prep, family=family.name)   # the family sizes the references (decode workers)
    ranks.start()
    lock = None
    try:
        lock = hold_output(out_dir, ranks, command or " ".join(sys.argv))   # before anything is written or deleted
        mine = shards[ranks.rank::ranks.world]
        todo, changed = _start(out_dir, mine, ranks)
        stats = _encode(model, out_dir, todo, device, prep=prep, opts=opts, captions=captions,
                        batch_size=batch_size, num_workers=num_workers, rows_per_shard=rows_per_shard,
                        writer_threads=writer_threads, progress=progress, already_done=len(mine) - len(todo),
                        rank=ranks.rank)
        t_manifest = time.perf_counter()
        stats.update(_finish(out_dir, shards, ranks, command or " ".join(sys.argv)))
        stats["manifest_s"] = time.perf_counter() - t_manifest
    finally:
        if lock is not None:
            lock.release()
        ranks.close()
    stats.update(rank=ranks.rank, world=ranks.world, shards_skipped_done=len(mine) - len(todo),
                 shards_reencoded=changed, manifest_url=out_dir.url_of(MANIFEST_NAME))
    return stats


def _start(out_dir: Store, mine: list[InputShard], ranks: Ranks) -> tuple[list[InputShard], int]:
    """(this rank's shards to encode, how many of them changed since they were encoded).

    Before the first barrier no rank writes anything; rank 0 sweeps temp files there, so each one
    it deletes is a killed earlier run's, never another rank's write in flight."""
    check_progress_version(out_dir)
    todo, changed = plan_shards(out_dir, mine)
    for _, message in changed:
        print(f"rank {ranks.rank}: {message}", file=sys.stderr, flush=True)
    forget(out_dir, [s.id for s, _ in changed])
    if ranks.rank == 0:
        sweep_temps(out_dir)
    ranks.barrier()
    remove_orphans(out_dir, [s.id for s in todo])
    return todo, len(changed)


def _encode(model: str, out_dir: Store, todo: list[InputShard], device, *, prep: PrepOptions, opts: EncodeOptions,
            captions: CaptionOptions, batch_size: int, num_workers: int, rows_per_shard: int, writer_threads: int,
            progress: bool, already_done: int, rank: int) -> dict:
    """Decode and encode `todo`, write its rows and done-records; returns this rank's counts."""
    # Workers start decoding while the models load.
    loader = DataLoader(ShardBatches(todo, prep, batch_size, captions), batch_size=None, num_workers=num_workers,
                        pin_memory=device.type == "cuda", worker_init_fn=worker_init,
                        prefetch_factor=4 if num_workers else None)
    batches = iter(loader) if todo else iter(())
    enc = Encoders(model, device, opts)
    settings = run_settings(enc, prep, opts, captions)
    check_or_write_settings(out_dir, settings)
    if not out_dir.exists(EMPTY_PROMPT_NAME):
        out_dir.write_bytes(EMPTY_PROMPT_NAME, save_safetensors(enc.empty_prompt()))
    bar = _progress_bar(progress, rank, todo, already_done)
    outputs = ShardOutputs(out_dir, todo, settings["dtypes"], rows_per_shard=rows_per_shard, text=enc.text_spec,
                           text_mode=opts.text_mode, bar=bar, rank=rank, references=prep.references)
    # Rows are written by background threads, each input shard's in order, while this one queues
    # the next batches. Each thread holds up to 4 batches: room for its fsync bursts.
    writer = RowWriterPool(outputs.write, threads=writer_threads, max_pending=4)
    try:
        waits = _encode_loop(batches, enc, writer, outputs, batch_size)
        writer.finish()
    except BaseException:
        writer.cancel()      # the batch being written ends; queued ones are dropped
        outputs.abort()      # finished output shards of unfinished inputs become orphans
        raise
    finally:
        if bar is not None:
            bar.close()
    return dict(outputs.stats, seconds=time.perf_counter() - outputs.t_start, **waits)


def _encode_loop(batches, enc: Encoders, writer: RowWriterPool, outputs: ShardOutputs, batch_size: int) -> dict:
    """Queue every batch's encoding and its write; returns where the main thread waited, which says
    what bounds a run: data (decoding), queueing the encoders' work (the device, once its queue is
    full), or the writer."""
    waits = {"wait_data_s": 0.0, "queue_encode_s": 0.0, "wait_writer_s": 0.0}
    outputs.t_start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        item = next(batches, None)
        t1 = time.perf_counter()
        waits["wait_data_s"] += t1 - t0
        if item is None:
            return waits
        outputs.stats["decode_s"] += item["decode_s"]
        host = (enc.encode_batch(item["pixels"], item["captions"], pad_to=batch_size,
                                 refs=[r["pixels"] for r in item["refs"]])
                if item["pixels"] is not None else None)
        if host is not None:   # the rows' other captions (none: an empty list), written with the rows
            item["alt_hosts"] = enc.encode_alt(item["alt_captions"], batch_size)
        t2 = time.perf_counter()
        writer.submit(item["shard"], item, host, last=item["end"])
        waits["queue_encode_s"] += t2 - t1
        waits["wait_writer_s"] += time.perf_counter() - t2


def _finish(out_dir: Store, shards: list[InputShard], ranks: Ranks, command: str) -> dict:
    """After every rank's done-records are written, rank 0 writes the manifest of this run's
    input shards; every rank learns what it holds (or the error that stopped it)."""
    ranks.barrier()
    result = None
    if ranks.rank == 0:
        try:
            manifest = write_cache_manifest(out_dir, shards, command, package_version())
            result = {"rows": manifest["rows"], "without_rows": manifest["inputs_without_rows"],
                      "skipped": manifest["skipped"], "skipped_examples": manifest["skipped_examples"]}
        except Exception as e:
            ranks.from_rank0({"error": f"{type(e).__name__}: {e}"})   # the other ranks stop too
            raise
    result = ranks.from_rank0(result)
    if "error" in result:
        raise CacheError(f"rank 0 could not write the manifest ({result['error']})")
    return {"manifest_written": True, "cache_rows": result["rows"], "inputs_without_rows": result["without_rows"],
            "cache_skipped": result["skipped"], "skipped_examples": result["skipped_examples"]}


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("flux-prep")
    except PackageNotFoundError:
        return "unknown"


def _progress_bar(enabled: bool, rank: int, todo: list[InputShard], already: int):
    return EncodeBar(todo, rank, already) if enabled else None
