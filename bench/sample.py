"""Seconds per denoising step of the FLUX transformer: plain diffusers eager vs. flux-sample's loop.

On a GPU (the issue's setting): the full 12B FLUX.1-dev transformer (random init, bf16), 1024x1024,
batch 1 (4096 image tokens + 512 T5 tokens), guidance embedding on. Every row runs in the same process
on the same weights and the same noise:

  diffusers eager        FluxPipeline's loop: FlowMatchEulerDiscreteScheduler + the transformer, eager
  loop eager             shared.sampling.denoise, no speed options (should equal the baseline)
  loop <options>         sample.loop.configure_speed: attention backend, fused q/k/v, per-block compile

    python bench/sample.py                      # on the GPU machine
    python bench/sample.py --device cpu --tiny  # smoke test, well under a minute
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sample.loop import configure_speed  # noqa: E402
from shared.family import get_family  # noqa: E402
from shared.sampling import denoise, initial_noise  # noqa: E402
from shared.text_batch import TextBatch  # noqa: E402
from shared.latents import image_ids, latent_size, text_ids  # noqa: E402

FLUX1 = get_family("flux1")
from shared.presets import transformer_config  # noqa: E402


def build_transformer(preset: str, device, dtype):
    """Random init straight on the device in the target dtype (12B in bf16: 24 GB, no fp32 copy)."""
    from diffusers import FluxTransformer2DModel
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = FluxTransformer2DModel(**transformer_config(preset))
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def diffusers_loop(transformer, noise, t5, clip, guidance, height, width, steps):
    """What FluxPipeline.__call__ does between prompt encoding and VAE decoding."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    h, w = latent_size(height, width)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=calculate_shift(noise.shape[1]),
                        device=noise.device)
    sched.set_begin_index(0)
    img, txt = image_ids(h, w, noise.device, noise.dtype), text_ids(t5.shape[1], noise.device, noise.dtype)
    x = noise
    for t in sched.timesteps:
        timestep = t.expand(x.shape[0]).to(x.dtype)
        v = transformer(hidden_states=x, timestep=timestep / 1000, guidance=guidance, pooled_projections=clip,
                        encoder_hidden_states=t5, txt_ids=txt, img_ids=img, return_dict=False)[0]
        x = sched.step(v, t, x, return_dict=False)[0]
    return x


def reset_speed(transformer):
    """Back to plain eager: blocks uncompiled, q/k/v unfused, the native attention backend."""
    for block in list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks):
        block._compiled_call_impl = None
    transformer.unfuse_qkv_projections()
    transformer.set_attention_backend("native")
    torch._dynamo.reset()


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


def default_backends(device) -> list[str]:
    if torch.device(device).type != "cuda":
        return ["native"]
    names = ["native", "_native_flash", "_native_cudnn"]
    try:
        import flash_attn_interface  # noqa: F401  (FlashAttention 3, Hopper)
        names.append("_flash_3")
    except ImportError:
        pass
    try:
        import flash_attn  # noqa: F401
        names.append("flash")
    except ImportError:
        pass
    return names


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="the tiny preset at 64x64, for a CPU smoke test")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per row (default 10, tiny 2)")
    ap.add_argument("--warmup-steps", type=int, default=2)
    ap.add_argument("--size", type=int, default=None, help="width = height in pixels (default 1024, tiny 64)")
    ap.add_argument("--t5-len", type=int, default=None, help="T5 tokens (default 512, tiny 32)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--backends", default=None, help="comma-separated attention backends to try compiled")
    ap.add_argument("--no-cudnn-sdpa", action="store_true", help="disable cuDNN SDPA for the whole run")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    ap.add_argument("--compile-backend", default=None, help="default inductor on GPU, eager on CPU (fast smoke)")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    preset = "tiny" if args.tiny else "flux-dev"
    steps = args.steps or (2 if args.tiny else 10)
    size = args.size or (64 if args.tiny else 1024)
    t5_len = args.t5_len or (32 if args.tiny else 512)
    compile_backend = args.compile_backend or ("inductor" if device.type == "cuda" else "eager")
    backends = args.backends.split(",") if args.backends else default_backends(device)
    if args.no_cudnn_sdpa:
        torch.backends.cuda.enable_cudnn_sdp(False)

    t0 = time.perf_counter()
    transformer = build_transformer(preset, device, dtype)
    cfg = transformer.config
    n_params = sum(p.numel() for p in transformer.parameters())
    print(f"# {preset}: {n_params / 1e9:.2f}B params, built in {time.perf_counter() - t0:.1f}s; {size}x{size}, "
          f"batch {args.batch}, T5 {t5_len}, {dtype}, {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    import diffusers
    print(f"# torch {torch.__version__}, diffusers {diffusers.__version__}, compile backend {compile_backend}")

    g = torch.Generator(device=device).manual_seed(0)
    t5 = torch.randn(args.batch, t5_len, cfg.joint_attention_dim, generator=g, device=device, dtype=dtype)
    clip = torch.randn(args.batch, cfg.pooled_projection_dim, generator=g, device=device, dtype=dtype)
    text = TextBatch(t5, clip, None)
    noise = initial_noise(FLUX1, 16, list(range(args.batch)), size, size, device, dtype)
    guidance = torch.full([args.batch], 3.5, device=device, dtype=torch.float32) if cfg.guidance_embeds else None

    rows = []

    def record(name, fn):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            per_step, warm, out = timed(fn, device, steps, args.warmup_steps)
        except Exception as e:  # noqa: BLE001 -- a backend missing here is a row, not the end of the run
            rows.append((name, None, None, None, None, f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"))
            return
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        diff = (out.float() - reference[0].float()).abs().max().item() if reference else 0.0
        rows.append((name, per_step, warm, peak, diff, ""))
        return out

    reference = []
    base = record("diffusers eager", lambda n: diffusers_loop(transformer, noise, t5, clip, guidance, size, size, n))
    if base is not None:
        reference.append(base)

    def ours(n):
        return denoise(FLUX1, transformer, noise, text, height_px=size, width_px=size, steps=n, shift=True,
                       guidance=3.5 if cfg.guidance_embeds else None)

    record("loop eager", ours)
    variants = [(b, False, False) for b in backends if b != "native"]
    variants += [(b, True, False) for b in backends] + [(b, True, True) for b in backends]
    for backend, compiled, fused in variants:
        reset_speed(transformer)
        try:
            configure_speed(transformer, compile_blocks=compiled, attention_backend=backend, fuse_qkv=fused,
                            mode=args.compile_mode, compile_backend=compile_backend)
        except Exception as e:  # noqa: BLE001
            rows.append((f"loop {backend}", None, None, None, None, f"{type(e).__name__}: {str(e)[:80]}"))
            continue
        name = f"loop {backend}" + (" +compile" if compiled else "") + (" +fused-qkv" if fused else "")
        record(name, ours)

    base_step = rows[0][1]
    print(f"\n| variant | s/step | speedup | warm-up s ({args.warmup_steps} steps) | peak GiB | max |dx| vs base "
          "| note |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for name, per_step, warm, peak, diff, note in rows:
        if per_step is None:
            print(f"| {name} | - | - | - | - | - | {note} |")
            continue
        speed = f"{base_step / per_step:.2f}x" if base_step else "-"
        print(f"| {name} | {per_step:.4f} | {speed} | {warm:.1f} | {peak:.1f} | {diff:.3g} | {note} |")


if __name__ == "__main__":
    main()
