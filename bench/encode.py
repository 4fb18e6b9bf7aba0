"""Benchmark of stage 1 (`flux-prep encode`): eager baselines vs. the project's encode path.

On a GPU (random-init weights at FLUX.1's real shapes, nothing downloaded):
    python bench/encode.py --device cuda --out /tmp/bench_encode
Smoke test on a CPU (tiny model, ~1 minute):
    python bench/encode.py --device cpu --tiny

Sections: VAE alone, T5 alone (padded-256, padded-512, trimmed on 20-40-token captions),
CLIP alone, the whole pipeline tar shards -> Parquet, image decoding per worker, bytes per
sample on disk per T5 mode, and cache read speed on one core vs. JSON lines of floats.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from encode_data import build_model, captions, write_shards  # noqa: E402 - bench/encode_data.py, beside this file

ROWS: list[tuple] = []


def record(section, variant, value, unit, note=""):
    ROWS.append((section, variant, value, unit, note))
    print(f"  {section:<10} {variant:<34} {value:>12.1f} {unit:<10} {note}", flush=True)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, iters, warmup=2) -> float:
    """Seconds per call, after warm-up calls (compilation, cuDNN autotuning)."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / iters


def clock_note(clock: dict | None) -> str:
    """bench/kernel_times.py ClockSampler's means, for a row's note."""
    return (f"; SM clock {clock['mhz']:.0f} MHz, {clock['watts']:.0f} W, at power cap {100 * clock['capped']:.0f}% "
            "of the time" if clock else "")


# -- sections ---------------------------------------------------------------------------------
def bench_components(model: Path, device: str, a) -> None:
    from diffusers import AutoencoderKL
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    from preprocess.encode import EncodeOptions, Encoders
    dt = torch.bfloat16 if device.startswith("cuda") else torch.float32
    bs, res = a.batch_size, a.resolution

    # Baselines: plain library classes, eager, float pixels from pageable host memory.
    vae = AutoencoderKL.from_pretrained(model / "vae", torch_dtype=dt).to(device).eval()
    pix_u8 = torch.randint(0, 256, (bs, 3, res, res), dtype=torch.uint8)
    pix_f = pix_u8.float() / 127.5 - 1
    with torch.inference_mode():
        s = timed(lambda: vae.encode(pix_f.to(device, dt)).latent_dist.mode(), device, a.iters)
    record("VAE", f"baseline eager {res}px", bs / s, "img/s", f"batch {bs}")
    del vae
    t5_tok = AutoTokenizer.from_pretrained(model / "tokenizer_2")
    t5 = T5EncoderModel.from_pretrained(model / "text_encoder_2", dtype=dt).to(device).eval()
    caps = captions(bs, 20, 40)
    baseline_t5 = {"padded-256": dict(padding="max_length", max_length=256),
                   "padded-512": dict(padding="max_length", max_length=512),
                   "trimmed": dict(padding="longest", max_length=512)}
    for label, kw in ((m, baseline_t5[m]) for m in a.modes):
        def run_t5():
            ids = t5_tok(caps, truncation=True, return_tensors="pt", **kw)
            mask = ids.attention_mask.to(device) if label == "trimmed" else None
            return t5(ids.input_ids.to(device), attention_mask=mask)[0]
        with torch.inference_mode():
            s = timed(run_t5, device, a.iters)
        record("T5", f"baseline eager {label}", bs / s, "prompts/s", f"batch {bs}")
    del t5
    clip_tok = AutoTokenizer.from_pretrained(model / "tokenizer")
    clip = CLIPTextModel.from_pretrained(model / "text_encoder", dtype=dt).to(device).eval()

    def run_clip():
        ids = clip_tok(caps, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        return clip(ids.input_ids.to(device)).pooler_output
    with torch.inference_mode():
        s = timed(run_clip, device, a.iters)
    record("CLIP", "baseline eager", bs / s, "prompts/s", f"batch {bs}")
    del clip
    torch.cuda.empty_cache() if device.startswith("cuda") else None

    # The project's path: Encoders (fused T5 wholly in bf16, cuDNN autotuned VAE, uint8 pinned pixels,
    # pinned token ids), loaded once; the T5 mode switches between rows, as a run's options would set it.
    pin = pix_u8.pin_memory() if device.startswith("cuda") else pix_u8
    compiled = (False, True) if a.compile else (False,)
    for compile_ in compiled:
        tag = "project compile" if compile_ else "project"
        enc = Encoders(str(model), device, EncodeOptions(text_mode="padded", text_max_length=256, compile=compile_))
        with torch.inference_mode():
            t0 = time.perf_counter()
            enc.encode_pixels(pin)
            sync(device)
            s = timed(lambda: enc.encode_pixels(pin), device, a.iters)
            record("VAE", f"{tag} {res}px", bs / s, "img/s", f"batch {bs}, first call {time.perf_counter() - t0:.0f}s")
            from shared.family.flux1_text import clip_pooled   # CLIP run up to the pooled token, as encode_prompts does
            s = timed(lambda: clip_pooled(enc.text.clip, enc.text.clip_tok(caps, padding="max_length", max_length=77,
                                                                 truncation=True, return_tensors="pt").input_ids,
                                          enc.text.clip_tok.eos_token_id, device), device, a.iters)
            record("CLIP", tag, bs / s, "prompts/s", f"batch {bs}, cut after the pooled token")

            def use_mode(label):
                enc.opts.text_mode = enc.text.mode = "trimmed" if label == "trimmed" else "padded"
                enc.text.max_length = 512 if label == "trimmed" else int(label.split("-")[1])

            def run_t5_project():   # T5 alone, tokenized and bucketed as Encoders.encode_text does
                from shared.family.flux1_text import _pad_to_bucket
                padded = enc.opts.text_mode == "padded"
                tok = enc.text.t5_tok(caps, padding="max_length" if padded else "longest", max_length=enc.text.max_length,
                                 truncation=True, return_tensors="pt")
                ids, mask = tok.input_ids, tok.attention_mask
                if not padded and enc.text.pad_multiple:
                    ids, mask = _pad_to_bucket(ids, mask, enc.text.pad_multiple, enc.text.max_length,
                                               enc.text.t5_tok.pad_token_id)
                return enc.text.t5(ids.to(device), attention_mask=None if padded else mask.to(device))[0]

            if compile_ and device.startswith("cuda"):
                # The compiled T5's attention kernels at each padded length asked for
                # (preprocess.encode.COMPILED_T5_ATTENTION picks one).
                from shared.t5_fused import ATTENTION
                chosen, blocks = enc.text.t5.attention, type(enc.text.t5).blocks.__get__(enc.text.t5)
                for label in [m for m in a.modes if m.startswith("padded-")]:
                    use_mode(label)
                    reference = None
                    for attention in ATTENTION:
                        enc.text.t5.attention = attention
                        enc.text.t5.blocks = torch.compile(blocks, dynamic=False)
                        try:
                            s = timed(run_t5_project, device, a.iters)
                            out = run_t5_project().float()
                        except Exception as e:   # noqa: BLE001 - a kernel this GPU or torch lacks
                            print(f"  T5 attention={attention}: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                            continue
                        reference = out if reference is None else reference
                        diff = (out - reference).abs().max().item()
                        record("T5", f"compile {label} attention={attention}", bs / s, "prompts/s",
                               f"batch {bs}, max |diff| vs {ATTENTION[0]} {diff:.3g}")
                enc.text.t5.attention, enc.text.t5.blocks = chosen, torch.compile(blocks, dynamic=False)
            for label in a.modes:
                use_mode(label)
                t0 = time.perf_counter()
                run_t5_project()
                sync(device)
                first = time.perf_counter() - t0
                s = timed(run_t5_project, device, a.iters)
                record("T5", f"{tag} {label}", bs / s, "prompts/s",
                       f"batch {bs}, T5 {enc.text.t5_impl}, first call {first:.0f}s")
                s = timed(lambda: enc.encode_batch(pin, caps).wait(), device, a.iters)
                record("encode", f"{tag} batch {label}", bs / s, "img/s", "VAE+T5+CLIP, no I/O")
                if a.encode_seconds and device.startswith("cuda"):
                    # As the pipeline runs it: batches queued while earlier ones copy back, no wait each.
                    from kernel_times import sustained
                    pending = collections.deque()

                    def queue_batch():
                        pending.append(enc.encode_batch(pin, caps))
                        if len(pending) > 2:
                            pending.popleft().wait()
                    s, clock = sustained(queue_batch, a.encode_seconds, warmup=2)
                    record("encode", f"{tag} batch {label}, {a.encode_seconds:g} s", bs / s, "img/s",
                           "VAE+T5+CLIP, no I/O, batches queued back to back" + clock_note(clock))
        del enc
        torch.cuda.empty_cache() if device.startswith("cuda") else None


def bench_decode(shards: list[Path], a) -> None:
    from preprocess.decode import PrepOptions, shard_batches
    from preprocess.sources import resolve_inputs
    torch.set_num_threads(1)
    [shard] = resolve_inputs(str(shards[0]))
    for draft in (False, True):
        t0, n = time.perf_counter(), 0
        for b in shard_batches(shard, PrepOptions(resolution=a.resolution, jpeg_draft=draft), a.batch_size):
            n += len(b["keys"])
        record("decode", f"1 worker, jpeg_draft={draft}", n / (time.perf_counter() - t0), "img/s",
               f"{a.resolution}px from {a.image_sizes}")


def bench_pipeline(model: Path, shards_glob: str, out_root: Path, device: str, a) -> dict:
    from preprocess.decode import PrepOptions
    from preprocess.encode import EncodeOptions
    from preprocess.encode_run import run_encode
    caches = {}
    for tag in a.modes:
        mode, length = ("trimmed", 512) if tag == "trimmed" else ("padded", int(tag.split("-")[1]))
        out = out_root / f"cache-{tag}"
        runs = [(w, t, att, wb) for w in a.worker_list for t in a.writer_list for att in a.attention_list
                for wb in a.writeback_list]
        for workers, writer_threads, attention, writeback in runs:
            if attention:   # the compiled T5's attention kernel for this run (the project's default otherwise)
                import preprocess.encode
                preprocess.encode.COMPILED_T5_ATTENTION = attention
            if writeback is not None:   # the cache writer's early write-back for this run
                import shared.cache.files
                shared.cache.files.WRITEBACK_BYTES = writeback << 20
            if out.exists():
                import shutil
                shutil.rmtree(out)
            from kernel_times import ClockSampler, KernelTimes
            # The board's clock and power after the first batch (steady state). An H100 kept busy
            # sits at its power cap; one that often idles shows below it (docs/BENCHMARKS.md, run F).
            clocks = ClockSampler(torch.cuda.current_device()) if device.startswith("cuda") else None
            with KernelTimes(enabled=a.profile) as kernels:
                stats = run_encode(str(model), shards_glob, out, prep=PrepOptions(resolution=a.resolution),
                                   opts=EncodeOptions(text_mode=mode, text_max_length=length,
                                                      compile=a.compile_pipeline and tag != "padded-512",
                                                      text_precision=getattr(a, "text_precision", "bf16")),
                                   batch_size=a.batch_size, num_workers=workers, rows_per_shard=a.rows_per_shard,
                                   device=device, progress=False, writer_threads=writer_threads)
                # The steady part: from the first batch written to the last, before the manifest is written.
                until = time.perf_counter() - stats["manifest_s"]
                clock = (clocks.stop(since=until - stats["seconds"] + stats["first_batch_s"], until=until)
                         if clocks else None)
            if a.profile:   # whole run, warm-up included: ms/image x steady img/s ~ the device's busy share
                print(kernels.report(f"pipeline {tag}, {stats['rows']} images", per=stats["rows"],
                                     per_unit="/image"), flush=True)
            kernel_note = f", T5 attention {attention}" if attention else ""
            if getattr(a, "text_precision", "bf16") != "bf16":   # bench/encode_fp8.py's runs
                kernel_note += f", text {a.text_precision}"
            if writeback is not None:
                kernel_note += f", write-back every {writeback} MiB" if writeback else ", no early write-back"
            record("pipeline", f"tar -> parquet {tag}", stats["rows"] / stats["seconds"], "img/s",
                   f"{workers} workers, {writer_threads} writer threads, {stats['rows']} rows{kernel_note}, "
                   f"first batch (warm-up) {stats['first_batch_s']:.0f}s")
            steady = (stats["rows"] - stats["first_batch_rows"]) / (stats["seconds"] - stats["first_batch_s"])
            record("pipeline", f"tar -> parquet {tag}, {writer_threads} writers{kernel_note}, after batch 1", steady,
                   "img/s",
                   "main thread waited: " + ", ".join(f"{k[:-2]} {100 * stats[k] / stats['seconds']:.0f}%"
                                                      for k in ("wait_data_s", "queue_encode_s", "wait_writer_s"))
                   + clock_note(clock))
        caches[tag] = out
        m = json.loads((out / "manifest.json").read_text())
        record("disk", f"bytes/sample {tag}", sum(s["bytes"] for s in m["shards"]) / m["rows"] / 1024, "KiB")
    return caches


def bench_read(cache: Path, out_root: Path, a) -> None:
    """Cache -> tensors on one core, vs. the same rows as JSON lines of floats."""
    from shared.cache import CacheReader
    torch.set_num_threads(1)
    reader = CacheReader(cache)
    t0, rows, nbytes = time.perf_counter(), 0, 0
    for shard in reader.shards:
        for g in reader.iter_shard(shard):
            rows += len(g["key"])
            for c in ("latent", "t5", "clip"):
                v = g[c]
                nbytes += sum(x.nbytes for x in v) if isinstance(v, list) else v.nbytes
    s = time.perf_counter() - t0
    record("read", f"parquet {cache.name}", rows / s, "rows/s", f"{nbytes / s / 1e9:.2f} GB/s into tensors")

    # JSON lines of floats (torchtitan-style preprocessing output), a subset of the same rows.
    path = out_root / "rows.jsonl"
    n_json = min(rows, a.json_rows)
    with open(path, "w") as f:
        written = 0
        for g in reader.iter_shard(reader.shards[0]):
            for i in range(len(g["key"])):
                if written >= n_json:
                    break
                t5 = g["t5"][i]
                f.write(json.dumps({"key": g["key"][i], "latent": g["latent"][i].float().tolist(),
                                    "t5": t5.float().tolist(), "clip": g["clip"][i].float().tolist()}) + "\n")
                written += 1
    t0, jrows, jbytes = time.perf_counter(), 0, 0
    with open(path) as f:
        for line in f:
            d = json.loads(line)
            ts = [torch.tensor(d[c], dtype=torch.bfloat16) for c in ("latent", "t5", "clip")]
            jrows += 1
            jbytes += sum(t.nbytes for t in ts)
    s = time.perf_counter() - t0
    record("read", f"json lines {cache.name}", jrows / s, "rows/s",
           f"{jbytes / s / 1e9:.4f} GB/s; {path.stat().st_size / jrows / 1024:.0f} KiB/row on disk")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="the tiny model and small sizes (CPU smoke test)")
    p.add_argument("--out", type=Path, default=Path("/tmp/bench_encode"))
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--samples", type=int, default=None, help="images in the pipeline run")
    p.add_argument("--num-workers", default=None, help="decode workers; a comma list runs the pipeline for each")
    p.add_argument("--writer-threads", default="2", help="output writer threads; a comma list runs each")
    p.add_argument("--t5-attention", default="",
                   help="comma list of the compiled T5's attention kernels (shared/t5_fused.py ATTENTION) to run "
                        "the pipeline with, each in turn (default: the project's choice)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="where the pipeline runs write their caches (default: --out); a RAM disk there leaves "
                        "the disk out of the pipeline's figure")
    p.add_argument("--writeback-mib", default="",
                   help="comma list of the cache writer's early write-back sizes (shared/cache/files.py "
                        "WRITEBACK_BYTES, in MiB; 0: none) to run the pipeline with, each in turn")
    p.add_argument("--rows-per-shard", type=int, default=1000)
    p.add_argument("--json-rows", type=int, default=None)
    p.add_argument("--compile", action="store_true",
                   help="also measure the compiled encoders (T5 and VAE, static shapes) in components")
    p.add_argument("--compile-pipeline", action="store_true",
                   help="torch.compile T5 and VAE in the padded-256 and trimmed pipeline runs (minutes more)")
    p.add_argument("--modes", default=None,
                   help="T5 modes, comma list of padded-256, padded-512, trimmed (default: all three; "
                        "tiny: padded-256,trimmed)")
    p.add_argument("--profile", action="store_true",
                   help="print the pipeline runs' GPU time by kernel kind (CUDA, torch.profiler)")
    p.add_argument("--encode-seconds", type=float, default=0,
                   help="CUDA: also run the no-I/O encode row for this many seconds, batches queued back to "
                        "back, with the GPU's clock and power (the short row waits for each of a few batches)")
    p.add_argument("--skip", default="", help="comma list of sections to skip: components,decode,pipeline,read")
    a = p.parse_args(argv)
    a.resolution = a.resolution or (64 if a.tiny else 256)
    a.batch_size = a.batch_size or (8 if a.tiny else 64)
    a.iters = a.iters or (2 if a.tiny else 5)
    a.samples = a.samples or (96 if a.tiny else 4096)
    a.worker_list = ([int(w) for w in a.num_workers.split(",")] if a.num_workers is not None
                     else [1 if a.tiny else min(12, os.cpu_count() - 2)])
    a.writer_list = [int(t) for t in a.writer_threads.split(",")]
    a.attention_list = [t.strip() for t in a.t5_attention.split(",") if t.strip()] or [None]
    a.writeback_list = [int(x) for x in a.writeback_mib.split(",") if x.strip()] or [None]
    from shared.t5_fused import ATTENTION
    if set(a.attention_list) - {None} - set(ATTENTION):
        p.error(f"--t5-attention: choose from {', '.join(ATTENTION)}")
    a.json_rows = a.json_rows or (32 if a.tiny else 64)
    a.image_sizes = [(96, 80), (80, 112)] if a.tiny else [(500, 375), (640, 480), (375, 500), (800, 533)]
    a.modes = [m.strip() for m in (a.modes or ("padded-256,trimmed" if a.tiny else
                                                "padded-256,trimmed,padded-512")).split(",") if m.strip()]
    bad = [m for m in a.modes if m != "trimmed" and not (m.startswith("padded-") and m[7:].isdigit())]
    if bad:
        p.error(f"unknown --modes {bad}: use padded-N (N tokens) or trimmed")
    skip = set(filter(None, a.skip.split(",")))
    a.out.mkdir(parents=True, exist_ok=True)
    dev_name = torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu"
    print(f"# bench/encode.py on {dev_name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}, "
          f"res {a.resolution}, batch {a.batch_size}, tiny={a.tiny}", flush=True)
    t0 = time.perf_counter()
    model = build_model(a.out / ("model-tiny" if a.tiny else "model-real"), a.tiny, a.device)
    print(f"  model folder ready in {time.perf_counter() - t0:.0f}s", flush=True)
    data = a.out / f"shards-{a.samples}-{a.tiny}"
    shards = sorted(data.glob("*.tar")) or write_shards(data, a.samples, max(16, a.samples // 16), a.image_sizes)
    if "components" not in skip:
        bench_components(model, a.device, a)
    if "decode" not in skip:
        bench_decode(shards, a)
    caches = {}
    if "pipeline" not in skip:
        caches = bench_pipeline(model, str(data / "*.tar"), a.cache_dir or a.out, a.device, a)
    if "read" not in skip:
        for cache in caches.values():
            bench_read(cache, a.out, a)
    print("\n| section | variant | value | unit | note |\n|---|---|---:|---|---|")
    for r in ROWS:
        print(f"| {r[0]} | {r[1]} | {r[2]:.1f} | {r[3]} | {r[4]} |")


if __name__ == "__main__":
    main()
