"""T5-XXL's matmuls alone, at the encode pipeline's shapes, with the GPU's clock and power.

    python bench/t5_gemm.py                       # CUDA; batch 64 x 256 tokens
    python bench/t5_gemm.py --length 512 --seconds 5

The fused T5 (shared/t5_fused.py) runs four matmuls per layer: q/k/v as one, the attention output,
the gated FF's two input projections as one, the FF output. Each row runs one of them (cuBLAS, as
inductor calls it) back to back for `--seconds`. It reports ms per call and TFLOP/s, and what
nvidia-smi sampled meanwhile: the SM clock, the board power, and the share of samples in which the
board's power cap held the clock down (bench/kernel_times.py sustained; 0 where nvidia-smi is
missing). The last row runs a layer's four in turn, as the encoder does. Its ms per image over 24
layers is the floor of T5's matmul time in the encode pipeline, at the clock this GPU sustains.
"""
from __future__ import annotations

import argparse
import sys

import torch
from kernel_times import sustained   # bench/kernel_times.py: this script's folder is on sys.path

D_MODEL, D_FF, LAYERS = 4096, 10240, 24   # T5-XXL (FLUX's text_encoder_2); q/k/v inner width = d_model
# name -> (in features, out features) of each fused matmul in a layer
MATMULS = {"q/k/v": (D_MODEL, 3 * D_MODEL), "attention out": (D_MODEL, D_MODEL),
           "FF in (gate, linear)": (D_MODEL, 2 * D_FF), "FF out": (D_FF, D_MODEL)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--length", type=int, default=256, help="T5 tokens per prompt (padded-256 or -512)")
    p.add_argument("--seconds", type=float, default=4.0, help="how long each row runs")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench/t5_gemm.py measures CUDA matmuls: no CUDA device here")
    torch.manual_seed(0)
    rows = a.batch_size * a.length
    print(f"# bench/t5_gemm.py on {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"{a.batch_size} x {a.length} tokens = {rows} rows, bf16, {a.seconds:g} s per row")
    print("| matmul | in -> out | ms/call | TFLOP/s | ms/image, 24 layers | SM clock, MHz | power, W "
          "| at power cap |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    inputs = {k: torch.randn(rows, k, device="cuda", dtype=torch.bfloat16) for k in (D_MODEL, D_FF)}
    weights = {name: torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k ** -0.5
               for name, (k, n) in MATMULS.items()}
    calls = {name: (lambda x=inputs[k], w=weights[name]: torch.nn.functional.linear(x, w))
             for name, (k, _) in MATMULS.items()}
    layer_flops = sum(2 * rows * k * n for k, n in MATMULS.values())

    def layer():
        for fn in calls.values():
            fn()
    measured = [(name, f"{k} -> {n}", calls[name], 2 * rows * k * n) for name, (k, n) in MATMULS.items()]
    measured.append(("a layer's four, in turn", "", layer, layer_flops))
    for name, shape, fn, flops in measured:
        seconds, c = sustained(fn, a.seconds)
        ms, c = 1e3 * seconds, c or {"mhz": 0, "watts": 0, "capped": 0}
        print(f"| {name} | {shape} | {ms:.3f} | {flops / ms / 1e9:.1f} | {ms * LAYERS / a.batch_size:.3f} | "
              f"{c['mhz']:.0f} | {c['watts']:.0f} | {100 * c['capped']:.0f}% |", flush=True)


if __name__ == "__main__":
    main()
