"""T5-XXL's attention alone, by kernel: what the compiled fused T5 (shared/t5_fused.py) can run.

    python bench/t5_attention.py                 # CUDA; batch 64, lengths 256 and 48
    python bench/t5_attention.py --lengths 256 --batch-size 32

Each row runs one layer's attention (64 heads of 64 dims, T5's relative position bias, no score
scaling) on random inputs and reports ms per call, ms per image over T5-XXL's 24 layers and
TFLOP/s. "padded" rows have no padding mask (FLUX's padded T5); "masked" rows mask a random tail of
each row's keys, as trimmed text does. The flash row has no bias at all: a floor, not a candidate.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HEADS, HEAD_DIM, LAYERS = 64, 64, 24


def cuda_ms(fn, iters: int) -> float:
    for _ in range(3):   # compilation, autotuning
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def kernels(q, k, v, table, key_pad):
    """name -> attend() for one set of inputs; the same additive bias for every kernel."""
    from torch.nn.attention.flex_attention import flex_attention

    from shared.t5_fused import FLEX_KERNEL_OPTIONS, _flex
    b, length = q.shape[0], q.shape[2]
    distance = torch.arange(length, device=q.device)[None, :] - torch.arange(length, device=q.device)[:, None]
    bias = table[:, distance + length - 1][None]
    if key_pad is not None:
        bias = bias + key_pad[:, None, None, :]
    mask = bias.expand(b, HEADS, length, length).contiguous() if key_pad is not None else bias.expand(b, -1, -1, -1)
    flex = torch.compile(_flex, dynamic=False)
    plain_flex = torch.compile(flex_attention, dynamic=False)
    full = bias[0] if key_pad is None else None

    def gather_mod(score, b_, h, q_idx, kv_idx):   # the whole [H, L, L] bias looked up per score
        return score + full[h, q_idx, kv_idx]
    rows = {
        "memory-efficient + bias": lambda: torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, mask, False, scale=1.0)[0],
        "cuDNN + bias": lambda: torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, mask, False, scale=1.0)[0],
        f"flex, position table, tile {FLEX_KERNEL_OPTIONS}": lambda: flex(q, k, v, table, key_pad),
    }
    if full is not None:
        rows["flex, position table, default tile"] = lambda: flex(q, k, v, table, None, kernel_options=None)
        rows["flex, full [H, L, L] bias, default tile"] = lambda: plain_flex(q, k, v, scale=1.0, score_mod=gather_mod)
        rows["flash, no bias (floor)"] = lambda: torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, scale=1.0)[0]
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lengths", default="256,48", help="comma list of token lengths")
    p.add_argument("--iters", type=int, default=30)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench/t5_attention.py measures CUDA kernels: no CUDA device here")
    torch.manual_seed(0)
    print(f"# bench/t5_attention.py on {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"batch {a.batch_size}, {HEADS} heads x {HEAD_DIM}")
    print("| length | masks | kernel | ms/call | ms/image, 24 layers | TFLOP/s | max abs diff vs memory-efficient |")
    print("|---:|---|---|---:|---:|---:|---:|")
    for length in (int(x) for x in a.lengths.split(",")):
        q, k, v = (torch.randn(a.batch_size, HEADS, length, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
                   for _ in range(3))
        table = torch.randn(HEADS, 2 * length - 1, device="cuda", dtype=torch.bfloat16)
        keep = torch.arange(length, device="cuda")[None] < torch.randint(length // 4, length + 1, (a.batch_size, 1),
                                                                         device="cuda")
        for key_pad in (None, (~keep).to(torch.bfloat16) * torch.finfo(torch.bfloat16).min):
            reference = None
            for name, fn in kernels(q, k, v, table, key_pad).items():
                try:
                    out = fn().float()
                    ms = cuda_ms(fn, a.iters)
                except Exception as e:   # noqa: BLE001 - a kernel this GPU or torch lacks
                    print(f"| {length} | {'masked' if key_pad is not None else 'padded'} | {name} | failed: "
                          f"{type(e).__name__}: {str(e)[:120]} | | | |")
                    continue
                reference = out if reference is None else reference
                diff = (out - reference).abs().max().item()
                flops = 4 * a.batch_size * HEADS * length * length * HEAD_DIM
                print(f"| {length} | {'masked' if key_pad is not None else 'padded'} | {name} | {ms:.3f} | "
                      f"{ms * LAYERS / a.batch_size:.3f} | {flops / ms / 1e9:.1f} | {diff:.3g} |", flush=True)


if __name__ == "__main__":
    main()
