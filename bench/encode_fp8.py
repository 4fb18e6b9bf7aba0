"""Issue 29 (encode): the text encoder's matmuls in float8 (`flux-prep encode --text-precision fp8`) against
bf16, on FLUX.1's real T5-XXL / CLIP-L / VAE shapes (random init: bench/encode_data.py) and on FLUX.2
[klein]'s Qwen3 (4B shapes, random init). Nothing is downloaded.

On a GPU, two calls of under 8 minutes each (estimated; the model folder, 10 GB, and the shards go to --out,
built once on a warm machine; the rows go to $OUT/encode_fp8.md as they come, so a killed call keeps its rows):
    python bench/encode_fp8.py --device cuda --out /tmp/be --skip pipeline,qwen3   # T5 and VAE+T5+CLIP, 3 variants
    python bench/encode_fp8.py --device cuda --out /tmp/be --skip t5               # the pipeline twice, then Qwen3
Smoke test on a CPU (tiny models, about a minute): python bench/encode_fp8.py --device cpu --tiny

Sections, each variant its own row (a variant that fails is a row saying why, and the rest go on):
- t5: per variant (bf16; fp8, the option: T5's FF output layer `wo` kept bf16; fp8 with `wo` too), the
  project's Encoders (compiled unless --no-compile) at padded-256, batch 64: T5 alone on tokenized prompts,
  back to back for --seconds; each fp8 variant's embedding difference from bf16 on the same prompts; then
  VAE + T5 + CLIP without I/O, batches queued back to back for --seconds, with the board's clock and power.
- pipeline: tar shards -> Parquet, padded-256, steady img/s, bf16 then fp8 (bench/encode.py's run).
- qwen3: FLUX.2 [klein]'s text encoder alone at 512 tokens (its decoder stack, as Flux2TextEncoder loads it;
  token ids drawn at random, 40-160 real tokens a prompt, the rest masked as the pipeline pads), the three
  tapped layers' states side by side: bf16, fp8, and their difference.

The difference (fp8 against bf16 on the same inputs): relative error of the whole batch's states (Frobenius),
the mean of each token's own relative error, and the lowest and mean per-token cosine similarity. Random-init
weights lack the trained models' activation outliers (T5's in its FF, LLMs' massive activations), which
float8's per-tensor scales handle worst: the difference measured here is a lower bound of the real weights'.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from argparse import Namespace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import encode as bench_encode  # noqa: E402 - bench/encode.py: record, timed, bench_pipeline
from encode_data import build_model, captions, write_shards  # noqa: E402
from kernel_times import sustained  # noqa: E402

QWEN3_4B = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                rope_theta=1000000.0, tie_word_embeddings=True)
QWEN3_TINY = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=28,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16)
RESULTS: list[Path] = []


def record(section, variant, value, unit, note=""):
    """bench/encode.py's row, also appended to the results file at once (a killed call keeps its rows)."""
    bench_encode.record(section, variant, value, unit, note)
    for path in RESULTS:
        with open(path, "a") as f:
            f.write(f"| {section} | {variant} | {value:.1f} | {unit} | {note} |\n")


def failed(section, variant, e: Exception):
    print(f"  {section} {variant}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
    record(section, variant, float("nan"), "-", f"failed: {type(e).__name__}: {str(e)[:200]}")


def difference(out: torch.Tensor, ref: torch.Tensor) -> str:
    """fp8 states against bf16's on the same inputs, [..., D] each."""
    a, b = out.float(), ref.float()
    token_rel = (a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-12)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    return (f"vs bf16: relative error {float((a - b).norm() / b.norm()):.4f} (per token: mean "
            f"{float(token_rel.mean()):.4f}), cosine per token min {float(cos.min()):.5f} mean {float(cos.mean()):.5f}")


def per_call(fn, device, a) -> tuple[float, str]:
    """Seconds per call: back to back for --seconds on a GPU (with its clock and power), a few calls elsewhere."""
    if device.startswith("cuda") and a.seconds:
        s, clock = sustained(fn, a.seconds, warmup=2)
        return s, f", {a.seconds:g} s back to back" + bench_encode.clock_note(clock)
    return bench_encode.timed(fn, device, a.iters), ""


# -- FLUX.1: T5 alone and VAE + T5 + CLIP, per variant --------------------------------------------------
T5_VARIANTS = (("bf16", "bf16", False), ("fp8", "fp8", False), ("fp8, wo too", "fp8", True))


def bench_t5(model: Path, device: str, a) -> None:
    import shared.text_float8 as text_float8
    from preprocess.encode import EncodeOptions, Encoders
    bs, caps, reference = a.batch_size, captions(a.batch_size, 20, 40), None
    pix = torch.randint(0, 256, (bs, 3, a.resolution, a.resolution), dtype=torch.uint8)
    pix = pix.pin_memory() if device.startswith("cuda") else pix
    for label, precision, wo in T5_VARIANTS:
        text_float8.T5_WO_FLOAT8 = wo
        try:
            t0 = time.perf_counter()
            enc = Encoders(str(model), device, EncodeOptions(text_mode="padded", text_max_length=256,
                                                             compile=a.compile, text_precision=precision))
            ids = enc.text.t5_tok(caps, padding="max_length", max_length=256, truncation=True,
                                  return_tensors="pt").input_ids.to(device)
            with torch.inference_mode():
                out = enc.text.t5(ids)[0].clone()
                bench_encode.sync(device)
                first = time.perf_counter() - t0
                s, note = per_call(lambda: enc.text.t5(ids)[0], device, a)
                reference = out if reference is None else reference
                diff = difference(out, reference) if precision != "bf16" else "the reference"
                record("T5", f"{label}, padded-256", bs / s, "prompts/s",
                       f"batch {bs}, T5 {enc.text.t5_impl}, compile {a.compile}, load + first call {first:.0f}s"
                       f"{note}; {diff}")
                s, note = per_call(lambda: enc.encode_batch(pix, caps).wait(), device, a)
                record("encode", f"{label}, padded-256, no I/O", bs / s, "img/s", f"VAE+T5+CLIP{note}")
        except Exception as e:   # noqa: BLE001 - a variant this GPU or torch cannot run: the others go on
            failed("T5", label, e)
        finally:
            text_float8.T5_WO_FLOAT8 = False
            enc = None
            torch.cuda.empty_cache() if device.startswith("cuda") else None


def bench_pipeline(model: Path, data: Path, device: str, a) -> None:
    """bench/encode.py's pipeline run (tar -> Parquet, padded-256), bf16 then fp8."""
    for precision in ("bf16", "fp8"):
        run = Namespace(modes=["padded-256"], worker_list=[a.num_workers], writer_list=[2], attention_list=[None],
                        writeback_list=[None], profile=False, batch_size=a.batch_size, resolution=a.resolution,
                        rows_per_shard=1000, compile_pipeline=a.compile, text_precision=precision)
        n = len(bench_encode.ROWS)
        try:
            bench_encode.bench_pipeline(model, str(data / "*.tar"), a.out / f"pipeline-{precision}", device, run)
        except Exception as e:   # noqa: BLE001
            failed("pipeline", precision, e)
        shutil.rmtree(a.out / f"pipeline-{precision}", ignore_errors=True)   # 2 MB an image at padded-256
        for row in bench_encode.ROWS[n:]:   # bench/encode.py printed them; into the results file too
            for path in RESULTS:
                with open(path, "a") as f:
                    f.write(f"| {row[0]} | {row[1]} ({precision}) | {row[2]:.1f} | {row[3]} | {row[4]} |\n")


# -- FLUX.2 [klein]: Qwen3 alone ----------------------------------------------------------------------
def bench_qwen3(device: str, a) -> None:
    from transformers import Qwen3Config, Qwen3Model

    from shared.family.flux2_text import MAX_LENGTH, QWEN3
    from shared.text_float8 import decoder_to_float8
    dt = torch.bfloat16 if device.startswith("cuda") else torch.float32
    cfg = Qwen3Config(**(QWEN3_TINY if a.tiny else QWEN3_4B))
    bs = a.qwen3_batch
    torch.manual_seed(0)
    with torch.device(device):
        decoder = Qwen3Model(cfg).to(dt).eval().requires_grad_(False)
    ids = torch.randint(0, cfg.vocab_size, (bs, MAX_LENGTH), device=device)
    real = torch.randint(40, 161, (bs, 1), device=device)
    mask = (torch.arange(MAX_LENGTH, device=device)[None] < real).long()   # right padding, as the tokenizer pads

    def states():   # as diffusers' _get_qwen3_prompt_embeds: the tapped layers' hidden states side by side
        out = decoder(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
        return torch.cat([out.hidden_states[k] for k in QWEN3.layers], dim=-1)

    reference = None
    for label in ("bf16", "fp8"):
        try:
            if label == "fp8":
                decoder_to_float8(decoder)
            if a.compile:   # as Flux2TextEncoder compiles it: each layer, static shapes
                for layer in decoder.layers:
                    layer.compile(dynamic=False)
            with torch.inference_mode():
                t0 = time.perf_counter()
                out = states().clone()
                bench_encode.sync(device)
                first = time.perf_counter() - t0
                s, note = per_call(states, device, a)
            reference = out if reference is None else reference
            diff = difference(out, reference) if label != "bf16" else "the reference"
            record("Qwen3", f"{label}, {MAX_LENGTH} tokens{' (tiny)' if a.tiny else ' (4B shapes)'}", bs / s,
                   "prompts/s", f"batch {bs}, compile {a.compile}, first call {first:.0f}s{note}; {diff}")
        except Exception as e:   # noqa: BLE001
            failed("Qwen3", label, e)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="the tiny models and small sizes (CPU smoke test)")
    p.add_argument("--out", type=Path, default=Path("/tmp/bench_encode"),
                   help="model folder, shards and caches (large: not $OUT)")
    p.add_argument("--results", type=Path, default=None,
                   help="the rows, as they come (default: $OUT/encode_fp8.md where $OUT is set, else --out's)")
    p.add_argument("--seconds", type=float, default=None, help="GPU: each timed row back to back this long")
    p.add_argument("--samples", type=int, default=None, help="images in each pipeline run")
    p.add_argument("--num-workers", type=int, default=None, help="decode workers of the pipeline runs")
    p.add_argument("--qwen3-batch", type=int, default=None)
    p.add_argument("--no-compile", dest="compile", action="store_false", help="eager encoders")
    p.add_argument("--skip", default="", help="comma list of sections to skip: t5,pipeline,qwen3")
    a = p.parse_args(argv)
    a.resolution, a.batch_size = (64, 8) if a.tiny else (256, 64)
    a.iters = 2 if a.tiny else 5
    a.seconds = 0 if a.tiny else (a.seconds if a.seconds is not None else 10)
    a.samples = a.samples or (32 if a.tiny else 4096)
    a.num_workers = a.num_workers if a.num_workers is not None else (0 if a.tiny else min(8, os.cpu_count() - 2))
    a.qwen3_batch = a.qwen3_batch or (2 if a.tiny else 16)
    a.compile = a.compile and a.device.startswith("cuda")   # inductor on the CPU: minutes for a smoke test
    skip = set(filter(None, a.skip.split(",")))
    a.out.mkdir(parents=True, exist_ok=True)
    RESULTS.append(a.results or (Path(os.environ["OUT"]) if os.environ.get("OUT") else a.out) / "encode_fp8.md")
    RESULTS[0].parent.mkdir(parents=True, exist_ok=True)
    dev_name = torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu"
    header = (f"# bench/encode_fp8.py on {dev_name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}, "
              f"res {a.resolution}, batch {a.batch_size}, tiny={a.tiny}, compile={a.compile}")
    print(header, flush=True)
    RESULTS[0].write_text(header + "\n\n| section | variant | value | unit | note |\n|---|---|---:|---|---|\n")
    if not {"t5", "pipeline"} <= skip:
        t0 = time.perf_counter()
        model = build_model(a.out / ("model-tiny" if a.tiny else "model-real"), a.tiny, a.device)
        print(f"  model folder ready in {time.perf_counter() - t0:.0f}s", flush=True)
    if "t5" not in skip:
        bench_t5(model, a.device, a)
    if "pipeline" not in skip:
        data = a.out / f"shards-{a.samples}-{a.tiny}"
        image_sizes = [(96, 80), (80, 112)] if a.tiny else [(500, 375), (640, 480), (375, 500), (800, 533)]
        if not sorted(data.glob("*.tar")):
            write_shards(data, a.samples, max(16, a.samples // 16), image_sizes)
        bench_pipeline(model, data, a.device, a)
    if "qwen3" not in skip:
        bench_qwen3(a.device, a)
    print(f"\nrows in {RESULTS[0]}")


if __name__ == "__main__":
    main()
