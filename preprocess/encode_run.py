"""One rank's encode run: its input shards -> output shards + done-records; the last rank to
finish writes the manifest. See progress.py for why a kill at any moment is harmless."""
from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

from safetensors.torch import save as save_safetensors
from torch.utils.data import DataLoader

from shared.cache import CacheWriter
from shared.cache.files import atomic_write_bytes
from shared.cache.schema import EMPTY_PROMPT_NAME
from shared.devices import resolve_device
from shared.precision import canonical_dtype

from .decode import PrepOptions, ShardBatches, worker_init
from .encode import EncodeOptions, Encoders
from .progress import (check_or_write_settings, finish_if_complete, read_done, remove_orphans, write_done)
from .row_writer import RowWriterPool
from .sources import InputError, resolve_inputs

CROP_RULE = "resize short side to target (ceil), center crop"


def dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as set by accelerate launch / torchrun; (0, 1, 0) alone."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def run_settings(enc: Encoders, prep: PrepOptions, opts: EncodeOptions) -> dict:
    store = canonical_dtype(opts.dtype)
    dtypes = {"latent": store, "t5": store, "clip": store}
    if opts.store_logvar:
        dtypes["latent_logvar"] = store
    return {
        "encoders": enc.identities,
        "image": {"resolution": prep.resolution, "buckets": prep.bucket_list(), "crop": CROP_RULE,
                  "min_size": prep.min_size, "jpeg_draft": prep.jpeg_draft},
        "t5": {"mode": opts.t5_mode, "max_length": enc.t5_max_length},
        "dtypes": dtypes, "compute_dtype": enc.compute_dtype_name, "t5_wo_dtype": enc.t5_wo_dtype(),
        "t5_impl": enc.t5_impl,   # recorded, not compared: both implementations compute the same function
        "dims": enc.dims(), "vae": enc.vae_factors(),
    }


class _ShardState:
    def __init__(self, writer: CacheWriter):
        self.writer, self.rows, self.skipped = writer, 0, {}


def run_encode(model: str, input_spec: str, output, *, prep: PrepOptions, opts: EncodeOptions,
               batch_size: int = 64, num_workers: int = 4, rows_per_shard: int = 1000,
               device: str | None = None, command: str | None = None, progress: bool = True,
               writer_threads: int = 2) -> dict:
    """Encode this rank's share of the input shards; returns a summary for this rank.
    `writer_threads`: threads writing output shards, each input shard's rows by one thread."""
    out_dir = Path(output)
    rank, world, local_rank = dist_env()
    device = resolve_device(device, local_rank)
    command = command or " ".join(sys.argv)
    shards = resolve_inputs(input_spec)
    mine = shards[rank::world]
    out_dir.mkdir(parents=True, exist_ok=True)
    done = read_done(out_dir)
    for shard in mine:
        recorded = done.get(shard.id, {}).get("content")
        if recorded is not None and recorded != shard.content():
            raise InputError(f"input shard {shard.id} holds other samples than when it was encoded into {out_dir} "
                             "(files added or removed?); encode into a new output folder")
    todo = [s for s in mine if s.id not in done]
    remove_orphans(out_dir, [s.id for s in todo], sweep_json_temps=rank == 0)

    # Workers start decoding while the models load.
    loader = DataLoader(ShardBatches(todo, prep, batch_size), batch_size=None, num_workers=num_workers,
                        pin_memory=device.type == "cuda", worker_init_fn=worker_init,
                        prefetch_factor=4 if num_workers else None)
    batches = iter(loader) if todo else iter(())
    enc = Encoders(model, device, opts)
    settings = run_settings(enc, prep, opts)
    check_or_write_settings(out_dir, settings)
    if not (out_dir / EMPTY_PROMPT_NAME).is_file():
        atomic_write_bytes(out_dir / EMPTY_PROMPT_NAME, save_safetensors(enc.empty_prompt()))

    dtypes = settings["dtypes"]
    states: dict[str, _ShardState] = {}
    stats = {"rows": 0, "skipped": 0, "shards_done": 0, "decode_s": 0.0}
    bar = _progress_bar(progress, rank, len(todo), len(mine) - len(todo))

    def state_of(shard_id):
        if shard_id not in states:
            states[shard_id] = _ShardState(CacheWriter(out_dir, shard_id, dtypes, rows_per_shard=rows_per_shard,
                                                       row_group_rows=min(256, rows_per_shard)))
        return states[shard_id]

    shared = threading.Lock()   # over `states`, `stats` and the bar: several writer threads update them

    def write(item, host):   # runs in a writer thread; an input shard's items all in the same one
        with shared:
            st = state_of(item["shard"])
            for reason, n in item["skips"].items():
                st.skipped[reason] = st.skipped.get(reason, 0) + n
                stats["skipped"] += n
        if host is not None:
            _write_rows(st.writer, item, host.wait(), opts.t5_mode)
            st.rows += len(item["keys"])
            with shared:
                stats["rows"] += len(item["keys"])
                if "first_batch_s" not in stats:   # model warm-up (compilation, cuDNN autotuning) ends here
                    stats["first_batch_s"], stats["first_batch_rows"] = time.perf_counter() - t_start, stats["rows"]
        if item["end"]:
            outputs = [s.to_dict() for s in st.writer.close()]
            shard = next(s for s in todo if s.id == item["shard"])
            write_done(out_dir, item["shard"], {"shard": item["shard"], "url": shard.url, "content": shard.content(),
                                                 "outputs": outputs, "rows": st.rows, "skipped": st.skipped})
            with shared:
                del states[item["shard"]]
                stats["shards_done"] += 1
        if bar is not None:
            with shared:
                bar.update(len(item["keys"]))
                bar.set_postfix(skipped=stats["skipped"], shards=f"{stats['shards_done']}/{len(todo)}",
                                refresh=False)

    # Rows are written by background threads, each input shard's in order, while this one queues
    # the next batches. Each thread holds up to 4 batches: room for its fsync bursts.
    writer = RowWriterPool(write, threads=writer_threads, max_pending=4)
    t_start = time.perf_counter()
    # Where the main thread waits says what bounds a run: data (decoding), queueing the encoders'
    # work (the device, once its queue is full), or the writer.
    waits = {"wait_data_s": 0.0, "queue_encode_s": 0.0, "wait_writer_s": 0.0}
    try:
        while True:
            t0 = time.perf_counter()
            item = next(batches, None)
            t1 = time.perf_counter()
            waits["wait_data_s"] += t1 - t0
            if item is None:
                break
            stats["decode_s"] += item["decode_s"]
            host = (enc.encode_batch(item["pixels"], item["captions"], pad_to=batch_size)
                    if item["pixels"] is not None else None)
            t2 = time.perf_counter()
            writer.submit(item["shard"], item, host, last=item["end"])
            waits["queue_encode_s"] += t2 - t1
            waits["wait_writer_s"] += time.perf_counter() - t2
        writer.finish()
    except BaseException:
        writer.cancel()              # the batch being written ends; queued ones are dropped
        for st in states.values():   # finished output shards of unfinished inputs become orphans
            st.writer.abort()
        raise
    finally:
        if bar is not None:
            bar.close()
    stats["seconds"] = time.perf_counter() - t_start
    stats.update(waits)
    t_manifest = time.perf_counter()
    complete = finish_if_complete(out_dir, [s.id for s in shards], command, package_version())
    stats["manifest_s"] = time.perf_counter() - t_manifest
    stats.update(rank=rank, world=world, manifest_written=complete, shards_skipped_done=len(mine) - len(todo))
    return stats


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("flux-prep")
    except PackageNotFoundError:
        return "unknown"


def _write_rows(writer: CacheWriter, item: dict, out: dict, t5_mode: str) -> None:
    lengths = out["t5_len"].tolist()
    t5 = out["t5"] if t5_mode == "padded" else [out["t5"][i, :n] for i, n in enumerate(lengths)]
    sizes = item["sizes"].tolist()
    writer.add_batch(keys=item["keys"], captions=item["captions"], latent=out["latent"], t5=t5, t5_len=lengths,
                     clip=out["clip"], widths=[s[0] for s in sizes], heights=[s[1] for s in sizes],
                     latent_logvar=out.get("latent_logvar"), copy=False)   # `out` is this batch's own host copy


def _progress_bar(enabled: bool, rank: int, todo: int, already: int):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(desc=f"encode[rank {rank}]" + (f" ({already} shards already done)" if already else ""),
                unit="img", position=rank, dynamic_ncols=True, mininterval=1.0 if sys.stderr.isatty() else 30.0)
