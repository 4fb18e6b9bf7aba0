"""Training throughput: the plain diffusers loop against the project's trainer reading a cache from disk.

    python bench/train.py                          # GPU: reduced FLUX (3072 wide, 4+8 blocks), 256px
    python bench/train.py --device cpu --tiny      # smoke test on a CPU (about a minute)

Rows: `baseline` = FluxTransformer2DModel, eager, autocast bf16, AdamW, random tensors already on the
device (no data loading, no masks); `trainer` = train.loop.Trainer streaming a synthetic cache of the
right shapes (written first under --cache-root, reused on reruns). Text: padded to 256 or 512 T5
positions (FLUX-exact), or trimmed (20-40 real tokens, padded per batch and masked).
`--cache-from local,s3` runs the trainer rows on the cache from disk and again from moto's S3 server,
started on 127.0.0.1 (tests/s3_server.py, the dev extra), the cache uploaded there first.
`--precision fp8` runs the trainer rows with float8 matmuls (run.precision fp8, torchao); the
baseline stays bf16. MFU = model FLOPs / (time x bf16 peak) in every precision; model FLOPs =
6 x (matmul weights each token passes through) x tokens + attention (12 x S^2 x width per layer),
counting real tokens only.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from flops import PEAK_BF16, attention_flops_per_image, linear_flops_per_image  # noqa: E402 - beside this file
from train_data import s3_server, upload, write_cache  # noqa: E402 - beside this file

from shared.presets import transformer_config  # noqa: E402


def model_config(tiny: bool) -> dict:
    if tiny:
        return transformer_config("tiny")
    return transformer_config("flux-schnell", num_layers=4, num_single_layers=8)


def text_settings(tiny: bool) -> dict:
    """name -> (mode, stored length or (min, max) real tokens)."""
    if tiny:
        return {"padded-32": ("padded", 32), "padded-64": ("padded", 64), "trimmed": ("trimmed", (5, 12))}
    return {"padded-256": ("padded", 256), "padded-512": ("padded", 512), "trimmed": ("trimmed", (20, 40))}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_baseline(cfg: dict, args, txt_len: int, latent_hw: int, device) -> dict:
    """The plain loop: no data loading, eager (or compiled) diffusers model, autocast bf16."""
    from diffusers import FluxTransformer2DModel
    from shared.latents import image_ids, text_ids
    with torch.device(device):
        torch.manual_seed(0)
        model = FluxTransformer2DModel(**cfg)
    if args.grad_checkpointing:
        model.enable_gradient_checkpointing()
    if args.compile:
        model.compile_repeated_blocks(fullgraph=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    b, tokens = args.batch_size, (latent_hw // 2) ** 2
    x = torch.randn(b, tokens, cfg["in_channels"], device=device)
    target = torch.randn_like(x)
    t5 = torch.randn(b, txt_len, cfg["joint_attention_dim"], device=device)
    clip = torch.randn(b, cfg["pooled_projection_dim"], device=device)
    t = torch.rand(b, device=device)
    img, txt = image_ids(latent_hw, latent_hw, device=device), text_ids(txt_len, device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision != "no")   # fp8: bf16 here

    def step():
        for _ in range(args.grad_accum):
            with amp:
                pred = model(hidden_states=x, encoder_hidden_states=t5, pooled_projections=clip, timestep=t,
                             img_ids=img, txt_ids=txt, return_dict=False)[0]
            loss = torch.nn.functional.mse_loss(pred.float(), target)
            (loss / args.grad_accum).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    elapsed = time.perf_counter() - start
    del model, opt
    return {"images_per_s": b * args.grad_accum * args.steps / elapsed, "data_wait": 0.0}


def run_trainer(cfg_overrides: dict, args, cache: str, device) -> dict:
    """The project's trainer, as `accelerate launch train` runs it, on the cache."""
    from accelerate.state import AcceleratorState
    from train.config import load_config
    from train.loop import Trainer
    from train.records import read_records
    window = max(1, args.warmup)
    steps = window * (1 + math.ceil(args.steps / window))
    out = tempfile.mkdtemp(prefix="flux-bench-run-")
    cfg = load_config(None, {
        "data.train_cache": str(cache), "data.batch_size": args.batch_size, "data.num_workers": args.num_workers,
        "data.shuffle_buffer": 4 * args.batch_size, "model.name": "flux-schnell" if not args.tiny else "tiny",
        "model.overrides": cfg_overrides, "run.output_dir": out, "run.max_steps": steps, "run.log_every": window,
        "run.precision": args.precision, "run.compile": args.compile, "run.grad_checkpointing": args.grad_checkpointing,
        "run.grad_accum": args.grad_accum, "run.masked_attention": args.masked_attention,
        "run.tensorboard": False, "run.progress": False, "run.save_final": False, "flow.guidance_dropout": 0.1,
        "optim.lr": 1e-5})
    trainer = Trainer(cfg)
    on_batch = None
    if args.profile:
        # Profile two whole optimizer steps after the untimed window (compilation is done by then).
        from kernel_times import KernelTimes
        first = window * args.grad_accum
        span = 2 * args.grad_accum
        seen, prof = [0], KernelTimes()

        def on_batch(batch):
            if seen[0] == first:
                prof.__enter__()
            elif seen[0] == first + span:
                prof.__exit__(None, None, None)
                images = span * args.batch_size
                print(prof.report(f"trainer {args.profile_label}, {images} images", per=images, per_unit="/image"),
                      flush=True)
            seen[0] += 1
    trainer.train(on_batch=on_batch)
    records = read_records(out)   # metrics.jsonl with timings.jsonl's images/s joined in
    timed = [r for r in records if "images_per_s" in r][1:]      # drop the warmup window
    trainer.accelerator.free_memory()
    del trainer
    AcceleratorState._reset_state(reset_partial_state=True)
    torch._dynamo.reset()   # each row compiles its own graphs
    return {"images_per_s": sum(r["images_per_s"] for r in timed) / len(timed),
            "data_wait": sum(r["data_wait"] for r in timed) / len(timed),
            "losses": [round(r["loss"], 4) for r in records if "loss" in r]}   # same seed and data in every row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="the tiny model at 64px (CPU smoke test)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (compile, allocator)")
    p.add_argument("--compile", action="store_true", help="torch.compile each repeated block")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--precision", default=None, choices=["bf16", "fp8", "no"],
                   help="trainer rows (fp8: float8 linears, torchao); the baseline row stays bf16")
    p.add_argument("--masked-attention", default="auto", choices=["auto", "sdpa", "flex"],
                   help="trainer rows, trimmed text: how the padding is masked (run.masked_attention)")
    p.add_argument("--num-workers", type=int, default=None)
    p.add_argument("--samples", type=int, default=None, help="rows per synthetic cache")
    p.add_argument("--text", default=None, help="comma list of text settings (default: all)")
    p.add_argument("--rows", default="baseline,trainer", help="comma list: baseline, trainer")
    p.add_argument("--cache-root", default=os.path.join(tempfile.gettempdir(), "flux-bench-caches"))
    p.add_argument("--cache-from", default="local", help="comma list: local, s3 (the trainer rows' cache)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--profile", action="store_true",
                   help="print GPU time by kernel kind over two steps of each trainer row (CUDA)")
    args = p.parse_args(argv)
    tiny = args.tiny
    args.batch_size = args.batch_size or (4 if tiny else 16)
    args.steps = args.steps or (6 if tiny else 20)
    args.warmup = args.warmup or (2 if tiny else 5)
    args.precision = args.precision or ("no" if args.device == "cpu" else "bf16")
    args.num_workers = args.num_workers if args.num_workers is not None else (1 if tiny else 6)
    args.samples = args.samples or (64 if tiny else 512)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)   # its backward crashed under autocast with Flux (torch 2.11)
        torch.backends.cuda.matmul.allow_tf32 = True
    cfg = model_config(tiny)
    overrides = {} if tiny else {"num_layers": 4, "num_single_layers": 8}
    latent_hw = 8 if tiny else 32                      # 64px / 256px
    dims = {"t5": cfg["joint_attention_dim"], "clip": cfg["pooled_projection_dim"]}
    img_tokens = (latent_hw // 2) ** 2
    with torch.device("meta"):
        from diffusers import FluxTransformer2DModel
        meta = FluxTransformer2DModel(**cfg)
    params = sum(p.numel() for p in meta.parameters())
    peak = next((v for k, v in PEAK_BF16.items() if device.type == "cuda" and k in torch.cuda.get_device_name()), None)
    settings = text_settings(tiny)
    chosen = args.text.split(",") if args.text else list(settings)
    shape = {"cfg": cfg, "overrides": overrides, "latent_hw": latent_hw, "dims": dims, "img_tokens": img_tokens,
             "peak": peak, "meta": meta}
    print(f"model: {params / 1e9:.2f}B params, {img_tokens} image tokens, batch {args.batch_size}, "
          f"grad_accum={args.grad_accum}, compile={args.compile}, grad_checkpointing={args.grad_checkpointing}, "
          f"device={args.device}", flush=True)
    sources = args.cache_from.split(",")
    if not set(sources) <= {"local", "s3"}:
        p.error(f"--cache-from: a comma list of local and s3, not {args.cache_from!r}")
    server = s3_server() if "s3" in sources else None
    try:
        rows = [row for name in chosen for row in text_rows(name, settings[name], sources, server, args, shape, device)]
    finally:
        if server is not None:
            server.stop()
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "params": params, "rows": rows}, indent=1))


def text_rows(name: str, setting, sources: list, server, args, shape: dict, device) -> list:
    """The rows of one text setting: the baseline once, then the trainer once per cache source."""
    mode, length = setting
    hw = shape["latent_hw"]
    cache, lengths = write_cache(Path(args.cache_root), f"{name}-{hw}-{args.samples}", mode, length,
                                 args.samples, hw, shape["dims"])
    where = {"local": str(cache)}
    if server is not None:
        where["s3"] = upload(cache, server, cache.name)
    tokens = shape["img_tokens"]
    cached = (sum(lengths) / len(lengths), sum((tokens + n) ** 2 for n in lengths) / len(lengths))   # mean T5, S^2
    base_len = length if mode == "padded" else length[1]
    runs = [(kind, src) for kind in args.rows.split(",") for src in (["-"] if kind == "baseline" else sources)]
    rows = []
    for kind, src in runs:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        row = {"row": kind, "text": name, "cache": src, "cache_url": where.get(src),
               "precision": "bf16" if kind == "baseline" and args.precision == "fp8" else args.precision}
        try:
            if kind == "baseline":
                result = run_baseline(shape["cfg"], args, base_len, hw, device)
                txt, sq = base_len, (tokens + base_len) ** 2
            else:
                args.profile_label = name
                result = run_trainer(shape["overrides"], args, where[src], device)
                txt, sq = cached
        except torch.OutOfMemoryError:
            from accelerate.state import AcceleratorState
            AcceleratorState._reset_state(reset_partial_state=True)
            torch._dynamo.reset()
            result = None
        if result is None:
            rows.append({**row, "error": "out of memory"})
        else:
            rows.append({**row, **throughput(result, shape, tokens, txt, sq, device)})
        print(json.dumps(rows[-1]), flush=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def throughput(result: dict, shape: dict, tokens: int, txt: float, sq: float, device) -> dict:
    """A row's images/s with its tokens/s, TFLOP/s, MFU, peak memory and data wait."""
    cfg, peak = shape["cfg"], shape["peak"]
    flops = linear_flops_per_image(shape["meta"], tokens, txt) + attention_flops_per_image(cfg, tokens, sq)
    ips = result["images_per_s"]
    return {"images_per_s": ips, "tokens_per_s": ips * (tokens + txt),
            "mfu": ips * flops / peak if peak else None, "tflops": ips * flops / 1e12,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
            "data_wait": result["data_wait"], "losses": result.get("losses")}


def print_table(rows):
    head = (f"{'row':<9} {'text':<11} {'cache':<6} {'prec':<5} {'img/s':>8} {'tok/s':>10} {'TFLOP/s':>8} {'MFU':>6} "
            f"{'mem GiB':>8} {'data wait':>9}")
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r['row']:<9} {r['text']:<11} {r['cache']:<6} {r.get('precision', ''):<5} {r['error']}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
        print(f"{r['row']:<9} {r['text']:<11} {r['cache']:<6} {r['precision']:<5} {r['images_per_s']:>8.1f} "
              f"{r['tokens_per_s']:>10.0f} "
              f"{r['tflops']:>8.2f} {mfu:>6} {mem:>8} {100 * r['data_wait']:>8.1f}%")


if __name__ == "__main__":
    main()
