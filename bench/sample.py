"""Seconds per denoising step of the FLUX transformer: plain diffusers eager vs. flux-sample's loop and its
speed options, bf16 and float8 (issue 29).

On a GPU (the issue's setting): the full transformer of a preset (random init, bf16; FLUX.1 [dev] 12B, or
FLUX.2 [klein] 4B/9B with --family flux2), 1024x1024, batch 1 (4096 image tokens + 512 text tokens). Every
row runs in the same process on the same weights and the same noise (bench/sample_setups.py):

  diffusers eager   the pipeline's own loop (FLUX.1: FluxPipeline's; FLUX.2: Flux2KleinPipeline's, whose true
                    CFG makes two transformer calls per step), eager: the speedup's base
  eager             shared.sampling.denoise with no speed option: the bf16 image the other rows are compared
                    to (its CFG halves run in one batched call)
  <variant>         sample.loop.configure_speed: an attention backend, fused q/k/v, per-block or whole
                    torch.compile (mode: default, max-autotune-no-cudagraphs, reduce-overhead = CUDA graphs),
                    float8 (flux-sample --precision fp8: run last, the conversion is in place)

Each row: s/step, speedup vs diffusers eager, warm-up (compilation) seconds, peak GiB, max |dx| of the final
latents vs diffusers eager, their relative difference (norm) vs the bf16 loop's, and the mean |difference|
of the decoded images (0-255) vs the bf16 loop's (a random-init VAE of the family's real config decodes
both). A variant that fails is a row with its error; the rest still run. With --out (default $OUT) the rows
are written to OUT/sample-<family>.json as each ends (a call cut off keeps what ran).

    python bench/sample.py --variants fast               # on the GPU machine, FLUX.1 [dev]
    python bench/sample.py --variants slow               # the long-compiling rows
    python bench/sample.py --family flux2 --variants fast
    python bench/sample.py --device cpu --tiny           # smoke test, well under a minute
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sample.loop import configure_speed  # noqa: E402
from shared.sampling import decode, denoise  # noqa: E402


def _load_setups():
    """bench/sample_setups.py, by path: bench/ on sys.path would shadow the `sample` package with this file."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_sample_setups", Path(__file__).with_name("sample_setups.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # (its dataclass looks its module up there)
    spec.loader.exec_module(module)
    return module


_setups = _load_setups()
PRESETS, SETUPS = _setups.PRESETS, _setups.SETUPS

AUTOTUNE, CUDA_GRAPHS = "max-autotune-no-cudagraphs", "reduce-overhead"


@dataclass(frozen=True)
class Variant:
    backend: str = "default"     # diffusers attention backend (attention_dispatch.py)
    compile: str | None = None   # "blocks" (flux-sample --compile) or "whole"
    mode: str | None = None      # torch.compile mode
    fused: bool = False          # fused q/k/v
    fp8: bool = False            # float8 linear layers (flux-sample --precision fp8)


VARIANTS = {
    "eager": Variant(),
    "native": Variant("native"),
    "_native_cudnn": Variant("_native_cudnn"),
    "_native_flash": Variant("_native_flash"),
    "_native_efficient": Variant("_native_efficient"),
    "compile": Variant(compile="blocks"),
    "compile+fused": Variant(compile="blocks", fused=True),
    "compile-cudnn": Variant("_native_cudnn", "blocks"),
    "compile-flash": Variant("_native_flash", "blocks"),
    "compile-autotune": Variant(compile="blocks", mode=AUTOTUNE),
    "compile-autotune+fused": Variant(compile="blocks", mode=AUTOTUNE, fused=True),
    "compile-cudagraphs": Variant(compile="blocks", mode=CUDA_GRAPHS),
    "compile-whole": Variant(compile="whole"),
    "fp8": Variant(fp8=True),
    "fp8-compile": Variant(compile="blocks", fp8=True),
    "fp8-compile-autotune": Variant(compile="blocks", mode=AUTOTUNE, fp8=True),
}
GROUPS = {
    "fast": "eager,_native_cudnn,_native_flash,_native_efficient,compile,compile+fused,compile-cudnn,fp8,fp8-compile",
    "slow": "eager,compile-autotune,compile-autotune+fused,compile-whole,compile-cudagraphs,fp8-compile-autotune",
    "tiny": "eager,native,compile,compile+fused,compile-whole,fp8,fp8-compile",   # CPU smoke (eager backend)
}


def selected(spec: str) -> list[str]:
    """Variant names from a comma list (group names expand); "eager" first (the bf16 image), float8 last."""
    names = [n for part in spec.split(",") if part for n in GROUPS.get(part, part).split(",")]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join([*VARIANTS, *GROUPS])}")
    names = ["eager"] + [n for n in dict.fromkeys(names) if n != "eager"]
    return sorted(names, key=lambda n: VARIANTS[n].fp8)


def reset_speed(transformer):
    """Back to plain eager: blocks and model uncompiled, q/k/v unfused, the native attention backend."""
    for block in list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks):
        block._compiled_call_impl = None
    transformer._compiled_call_impl = None
    transformer.unfuse_qkv_projections()
    transformer.set_attention_backend("native")
    torch._dynamo.reset()


def apply(setup, v: Variant, compile_backend: str, converted: bool):
    reset_speed(setup.transformer)
    if v.fp8 and v.fused and converted:
        raise ValueError("fused q/k/v are fused from bf16 weights: not after the float8 conversion")
    configure_speed(setup.transformer, compile_blocks=v.compile == "blocks", attention_backend=v.backend,
                    fuse_qkv=v.fused, mode=v.mode, compile_backend=compile_backend,
                    float8_family=setup.family if v.fp8 and not converted else None)
    if v.compile == "whole":
        setup.transformer.compile(mode=v.mode, backend=compile_backend)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, steps: int, warmup_steps: int):
    """(seconds per step, seconds of warm-up incl. compilation, result of the timed run)."""
    sync(device)
    t0 = time.perf_counter()
    fn(warmup_steps)
    sync(device)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = fn(steps)
    sync(device)
    return (time.perf_counter() - t0) / steps, warm, out


class Rows:
    """The rows so far, each compared with the baseline's latents and the bf16 loop's latents and image;
    written to `path` (JSON) as each ends."""

    def __init__(self, setup, size: int, path: Path | None, header: dict):
        self.setup, self.size, self.path, self.header = setup, size, path, header
        self.rows, self.base, self.bf16, self.bf16_px, self.vae = [], None, None, None, None

    def pixels(self, x):
        if self.vae is None:
            self.vae = self.setup.make_vae()
        return decode(self.setup.family, self.vae, x.to(self.vae.dtype), self.size, self.size).to(torch.int16)

    def add(self, name: str, per_step=None, warm=None, peak=None, out=None, error: str = ""):
        row = {"name": name, "s_per_step": per_step, "warmup_s": warm, "peak_gib": peak, "error": error}
        if out is not None:
            self.base = out if self.base is None else self.base
            row["max_abs_dx_vs_diffusers"] = (out.float() - self.base.float()).abs().max().item()
            if name == "eager":
                self.bf16, self.bf16_px = out, self.pixels(out)
            if self.bf16 is not None:
                d = out.float() - self.bf16.float()
                row["latent_rel_diff_vs_bf16"] = (d.norm() / self.bf16.float().norm()).item()
                row["mean_abs_px_diff_vs_bf16"] = (self.pixels(out) - self.bf16_px).abs().float().mean().item()
        self.rows.append(row)
        self.write()

    def write(self):
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({**self.header, "rows": self.rows}, indent=1))
        tmp.replace(self.path)


def run_row(rows: Rows, name: str, fn, device, steps: int, warmup: int):
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        per_step, warm, out = timed(fn, device, steps, warmup)
    except Exception as e:  # noqa: BLE001 -- a variant that fails here is a row, not the end of the run
        rows.add(name, error=f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
        return
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if torch.device(device).type == "cuda" else None
    rows.add(name, per_step, warm, peak, out)


def print_table(rows: list[dict], warmup: int):
    base = rows[0]["s_per_step"] if rows and rows[0]["name"] == "diffusers eager" else None
    print(f"\n| variant | s/step | speedup | warm-up s ({warmup} steps) | peak GiB | max |dx| vs diffusers "
          "| latent rel. diff vs bf16 | mean |px diff| vs bf16 (0-255) | note |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for r in rows:
        speed = f"{base / r['s_per_step']:.2f}x" if base and r["s_per_step"] else "-"
        print(f"| {r['name']} | {fmt(r['s_per_step'], '.4f')} | {speed} | {fmt(r['warmup_s'], '.1f')} | "
              f"{fmt(r['peak_gib'], '.1f')} | {fmt(r.get('max_abs_dx_vs_diffusers'), '.3g')} | "
              f"{fmt(r.get('latent_rel_diff_vs_bf16'), '.3g')} | {fmt(r.get('mean_abs_px_diff_vs_bf16'), '.3g')} | "
              f"{r['error']} |")


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=sorted(SETUPS), default="flux1")
    ap.add_argument("--preset", default=None, help="default flux-dev (flux1), flux2-klein-4b (flux2); tiny with --tiny")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="the tiny preset at 64x64, for a CPU smoke test")
    ap.add_argument("--variants", default=None, help=f"comma list of {', '.join(VARIANTS)} or a group: "
                    f"{'; '.join(f'{k} = {v}' for k, v in GROUPS.items())} (default: fast, tiny with --tiny)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per row (default 10, tiny 2)")
    ap.add_argument("--warmup-steps", type=int, default=2)
    ap.add_argument("--size", type=int, default=None, help="width = height in pixels (default 1024, tiny 64)")
    ap.add_argument("--text-len", "--t5-len", type=int, default=None, help="text tokens (default 512, tiny 32)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--no-cudnn-sdpa", action="store_true", help="disable cuDNN SDPA for the whole run")
    ap.add_argument("--compile-backend", default=None, help="default inductor on GPU, eager on CPU (fast smoke)")
    ap.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None,
                    help="folder for sample-<family>.json, written as each row ends (default: $OUT, if set)")
    return ap.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    preset = args.preset or PRESETS[args.family][1 if args.tiny else 0]
    steps, size = args.steps or (2 if args.tiny else 10), args.size or (64 if args.tiny else 1024)
    text_len = args.text_len or (32 if args.tiny else 512)
    compile_backend = args.compile_backend or ("inductor" if device.type == "cuda" else "eager")
    names = selected(args.variants or ("tiny" if args.tiny else "fast"))
    if args.no_cudnn_sdpa:
        torch.backends.cuda.enable_cudnn_sdp(False)

    t0 = time.perf_counter()
    setup = SETUPS[args.family](preset, device, dtype, args.batch, size, text_len, args.tiny)
    n_params = sum(p.numel() for p in setup.transformer.parameters())
    import diffusers
    header = {"family": args.family, "preset": preset, "params": n_params, "size": size, "batch": args.batch,
              "text_len": text_len, "steps": steps, "warmup_steps": args.warmup_steps, "dtype": str(dtype),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
              "torch": torch.__version__, "diffusers": diffusers.__version__, "compile_backend": compile_backend,
              "cfg_scale": setup.cfg_scale}
    print(f"# {preset}: {n_params / 1e9:.2f}B params, built in {time.perf_counter() - t0:.1f}s; {size}x{size}, "
          f"batch {args.batch}, text {text_len}, CFG {setup.cfg_scale}, {dtype}, {header['device']}")
    print(f"# torch {torch.__version__}, diffusers {diffusers.__version__}, compile backend {compile_backend}; "
          f"variants {','.join(names)}", flush=True)
    out = args.out / f"sample-{args.family}.json" if args.out else None
    rows = Rows(setup, size, out, header)
    run_row(rows, "diffusers eager", setup.baseline, device, steps, args.warmup_steps)

    def ours(n):
        return denoise(setup.family, setup.transformer, setup.noise, setup.text, height_px=size, width_px=size,
                       steps=n, shift=True, guidance=setup.guidance, cfg_scale=setup.cfg_scale)

    converted = False
    for name in names:
        try:
            apply(setup, VARIANTS[name], compile_backend, converted)
        except Exception as e:  # noqa: BLE001
            rows.add(name, error=f"setup: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
            continue
        converted = converted or VARIANTS[name].fp8
        run_row(rows, name, ours, device, steps, args.warmup_steps)
        print(f"# {name}: {rows.rows[-1]['s_per_step'] or rows.rows[-1]['error']}", flush=True)
    print_table(rows.rows, args.warmup_steps)
    return rows.rows


if __name__ == "__main__":
    main()
