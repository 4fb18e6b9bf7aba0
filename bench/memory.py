"""Memory and speed of the 12B FLUX transformer in training on one GPU: plain loops beside the trainer.

    python bench/memory.py --suite lora       # LoRA rank 16 at 1024px: baseline, bf16/8-bit/nf4 bases, block swap
    python bench/memory.py --suite full       # full-weight training at 512px: adamw8bit, Adafactor, block swap
    python bench/memory.py --suite speed      # the full-weight rows' speed: trainer and plain loops taking turns
    python bench/memory.py --suite fidelity   # the reduced 2.55B model, 200 steps: 8-bit bases and optimizers
    python bench/memory.py --suite smoke      # a small model on the GPU: every path runs, block swap is exact
    python bench/memory.py --suite smoke --device cpu --tiny    # the same on a CPU, tiny model (a minute)

FLUX.1-dev's real shapes (random init), batch 1, T5 padded to 512, activation checkpointing, bf16
autocast. Each 12B row runs in a process of its own (an out-of-memory ends only that row).
Rows:
- `plain-lora`: diffusers' FluxTransformer2DModel built in bf16, peft LoRA (the trainer's targets)
  in fp32, fused AdamW; random tensors already on the GPU, the same batch each step. No project code.
- `plain-full`: the same model, every weight trained in bf16, one optimizer per parameter stepped by
  its post-accumulate-grad hook (torchao AdamW8bit with stochastic rounding, or transformers'
  Adafactor). No project code.
- `trainer`: train.loop.Trainer as `accelerate launch train` runs it, on a synthetic cache of the
  right shapes (one sample for the full rows: a fixed batch; new timesteps and noise each step).
Peak memory is torch.cuda.max_memory_allocated over the training steps, counted from when the model
is set up (`setup GiB` is the peak before that: a random init is built whole on the GPU in bf16,
published weights are placed block by block; the `load` rows read such weights from disk and count
everything). MFU = model FLOPs / (time x bf16 peak): 6 x weights x tokens for full training, 4 x for
LoRA (no weight gradients for the frozen base), plus attention (bench/flops.py).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from flops import PEAK_BF16, attention_flops_per_image, linear_flops_per_image  # noqa: E402 - beside this file
from train_data import write_cache  # noqa: E402 - beside this file

from shared.presets import transformer_config  # noqa: E402

TEXT = 512
REDUCED = {"num_layers": 4, "num_single_layers": 8}     # the 2.55B model of bench/train.py
SMOKE = {"num_layers": 2, "num_single_layers": 4}


def rows(suite: str, tiny: bool) -> list[dict]:
    lora = {"lora.rank": 16, "run.precision": "bf16", "optim.lr": 1e-4}
    full = {"model.weights_dtype": "bf16", "run.precision": "bf16", "optim.in_backward": True,
            "optim.grad_clip": 0.0, "optim.lr": 1e-5}
    if suite == "lora":
        base = {"res": 1024, "warmup": 3, "steps": 10}
        return [{**base, "kind": "plain-lora", "name": "plain loop, bf16 base"},
                {**base, "kind": "trainer", "name": "bf16 base", "config": lora},
                {**base, "kind": "trainer", "name": "int8 base", "config": {**lora, "model.quantize_base": "int8"}},
                {**base, "kind": "trainer", "name": "float8 base", "config": {**lora, "model.quantize_base": "float8"}},
                {**base, "kind": "trainer", "name": "nf4 base", "config": {**lora, "model.quantize_base": "nf4"}},
                *[{**base, "kind": "trainer", "name": f"bf16 base, {n} blocks swapped",
                   "config": {**lora, "run.offload_blocks": n}} for n in (19, 38, 57)],
                {**base, "kind": "trainer", "name": "load: float8 base from disk", "load": True,
                 "config": {**lora, "model.quantize_base": "float8"}}]
    if suite == "full":
        base = {"res": 512, "warmup": 3, "steps": 47, "samples": 1, "log_every": 10}
        plain = {"res": 512, "warmup": 3, "steps": 12}
        return [{**plain, "kind": "plain-full", "name": "plain loop, adamw8bit", "optim": "adamw8bit"},
                {**plain, "kind": "plain-full", "name": "plain loop, adafactor", "optim": "adafactor"},
                {**base, "kind": "trainer", "name": "adamw8bit", "config": {**full, "optim.name": "adamw8bit"}},
                {**base, "kind": "trainer", "name": "adafactor", "config": {**full, "optim.name": "adafactor"}},
                {**base, "kind": "trainer", "name": "adafactor, 38 blocks swapped", "same_as": "adafactor",
                 "config": {**full, "optim.name": "adafactor", "run.offload_blocks": 38}},
                # where the time goes: a few steps under torch.profiler (BENCH_PROFILE_DIR)
                {**plain, "kind": "plain-full", "name": "profile: plain loop, adafactor", "optim": "adafactor",
                 "steps": 3, "profile": 3},
                {**base, "kind": "trainer", "name": "profile: adafactor", "steps": 3, "log_every": 1, "profile": True,
                 "config": {**full, "optim.name": "adafactor"}}]
    if suite == "speed":   # the full-weight rows' speed, trainer and plain loop taking turns (20 timed steps)
        base = {"res": 512, "warmup": 3, "steps": 20, "samples": 1, "log_every": 10}
        plain = {"res": 512, "warmup": 3, "steps": 20}
        adafactor = {**full, "optim.name": "adafactor"}
        return [{**plain, "kind": "plain-full", "name": "plain loop, adafactor", "optim": "adafactor"},
                {**base, "kind": "trainer", "name": "adafactor", "config": adafactor},
                {**base, "kind": "trainer", "name": "adafactor, one parameter a step", "group_elements": 1,
                 "config": adafactor},
                {**plain, "kind": "plain-full", "name": "plain loop, adafactor, again", "optim": "adafactor"},
                {**base, "kind": "trainer", "name": "adafactor, no DataLoader workers",
                 "config": {**adafactor, "data.num_workers": 0}},
                {**plain, "kind": "plain-full", "name": "plain loop, adamw8bit", "optim": "adamw8bit"},
                {**base, "kind": "trainer", "name": "adamw8bit", "config": {**full, "optim.name": "adamw8bit"}}]
    if suite == "fidelity":
        base = {"res": 256, "warmup": 0, "steps": 200, "overrides": REDUCED, "batch": 2, "log_every": 1,
                "text": 256, "samples": 64}
        lora_f = {**lora, "optim.lr": 1e-3}
        return [{**base, "kind": "trainer", "name": "LoRA, bf16 base", "config": lora_f},
                *[{**base, "kind": "trainer", "name": f"LoRA, {q} base",
                   "config": {**lora_f, "model.quantize_base": q}} for q in ("int8", "float8", "nf4")],
                {**base, "kind": "trainer", "name": "full, fp32 AdamW",
                 "config": {"optim.lr": 1e-4, "optim.grad_clip": 0.0}},
                *[{**base, "kind": "trainer", "name": f"full, bf16 {o}",
                   "config": {**full, "optim.name": o, "optim.lr": 1e-4}} for o in ("adamw8bit", "adafactor")]]
    if suite == "smoke":
        base = {"res": 64 if tiny else 256, "warmup": 0, "steps": 4, "overrides": {} if tiny else SMOKE,
                "tiny": tiny, "log_every": 1, "text": 32 if tiny else 64}
        big_lr = {"optim.lr": 1e-3}
        swap = {"run.offload_blocks": 3, "run.grad_checkpointing": True}
        cases = {"LoRA bf16": {**lora, **big_lr}, "LoRA int8": {**lora, "model.quantize_base": "int8"},
                 "LoRA float8": {**lora, "model.quantize_base": "float8"},
                 "LoRA nf4": {**lora, "model.quantize_base": "nf4"},
                 "full adamw8bit": {**full, "optim.name": "adamw8bit", "optim.in_backward": False,
                                    "optim.grad_clip": 1.0, **big_lr},
                 "full adafactor in backward": {**full, "optim.name": "adafactor", **big_lr}}
        out = [{**base, "kind": "trainer", "name": name, "config": c} for name, c in cases.items()]
        out += [{**base, "kind": "trainer", "name": "LoRA bf16, again", "same_as": "LoRA bf16",
                 "config": cases["LoRA bf16"]},
                {**base, "kind": "trainer", "name": "LoRA bf16, swapped", "same_as": "LoRA bf16",
                 "config": {**cases["LoRA bf16"], **swap}},
                {**base, "kind": "trainer", "name": "full adafactor in backward, swapped",
                 "same_as": "full adafactor in backward", "config": {**cases["full adafactor in backward"], **swap}}]
        return out
    raise SystemExit(f"unknown suite {suite!r}")


def model_config(row: dict) -> dict:
    return transformer_config("tiny" if row.get("tiny") else "flux-dev", **row.get("overrides", {}))


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_gib(device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def bf16_model(cfg: dict, device):
    from diffusers import FluxTransformer2DModel
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            return FluxTransformer2DModel(**cfg)
    finally:
        torch.set_default_dtype(before)


def fixed_batch(cfg: dict, res: int, text: int, device) -> dict:
    from shared.latents import image_ids, text_ids
    g = torch.Generator(device=device).manual_seed(0)
    hw = res // 8
    tokens = (hw // 2) ** 2
    return {"hidden_states": torch.randn(1, tokens, cfg["in_channels"], device=device, generator=g),
            "encoder_hidden_states": torch.randn(1, text, cfg["joint_attention_dim"], device=device, generator=g),
            "pooled_projections": torch.randn(1, cfg["pooled_projection_dim"], device=device, generator=g),
            "timestep": torch.rand(1, device=device, generator=g),
            "guidance": torch.full((1,), 3.5, device=device) if cfg["guidance_embeds"] else None,
            "img_ids": image_ids(hw, hw, device=device), "txt_ids": text_ids(text, device=device),
            "target": torch.randn(1, tokens, cfg["in_channels"], device=device, generator=g)}


def timed_loop(step, warmup: int, steps: int, device, profile: int = 0, name: str = "") -> tuple[float, list]:
    losses = [step() for _ in range(warmup)]
    sync()
    reset_peak(device)
    start = time.perf_counter()
    losses += [step() for _ in range(steps)]
    sync()
    seconds = (time.perf_counter() - start) / steps
    if profile:
        with profiler() as prof:
            for _ in range(profile):
                step()
                prof.step()
        print_profile(prof, name)
    return seconds, [float(x) for x in losses]


def profiler():
    acts = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    return torch.profiler.profile(activities=acts)


def print_profile(prof, name: str) -> None:
    """The ops that cost most, on the device and on the host, into BENCH_PROFILE_DIR (default: here)."""
    sync()
    averages = prof.key_averages()
    tables = [averages.table(sort_by=key, row_limit=25, max_name_column_width=70)
              for key in ("self_device_time_total", "self_cpu_time_total", "cpu_time_total")]
    path = Path(os.environ.get("BENCH_PROFILE_DIR", ".")) / (re.sub(r"[^A-Za-z0-9]+", "-", name) + ".txt")
    path.write_text("\n\n".join(tables))
    print(f"profile of {name!r} in {path}", file=sys.stderr)


def plain_step(model, batch: dict, device):
    inputs = {k: v for k, v in batch.items() if k != "target"}

    def forward_backward():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            pred = model(**inputs, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred.float(), batch["target"])
        loss.backward()
        return loss.detach()
    return forward_backward


def run_plain_lora(row: dict, device) -> dict:
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    from shared.family import get_family
    DEFAULT_LORA_TARGETS = get_family("flux1").default_lora_targets
    cfg = model_config(row)
    model = bf16_model(cfg, device)
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian",
                                 target_modules=DEFAULT_LORA_TARGETS))
    cast_training_params(model, dtype=torch.float32)
    model.enable_gradient_checkpointing()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    forward_backward = plain_step(model, fixed_batch(cfg, row["res"], row.get("text", TEXT), device), device)

    def step():
        loss = forward_backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    setup = peak_gib(device)
    seconds, losses = timed_loop(step, row["warmup"], row["steps"], device)
    return {"s_per_step": seconds, "losses": losses, "setup_gib": setup, "trainable": sum(p.numel() for p in params)}


def run_plain_full(row: dict, device) -> dict:
    cfg = model_config(row)
    model = bf16_model(cfg, device)
    model.enable_gradient_checkpointing()
    if row["optim"] == "adamw8bit":
        from torchao.optim import AdamW8bit
        make = lambda p: AdamW8bit([p], lr=1e-5, bf16_stochastic_round=True)  # noqa: E731
    else:
        from transformers.optimization import Adafactor
        make = lambda p: Adafactor([p], lr=1e-5, scale_parameter=False, relative_step=False)  # noqa: E731
    optimizers = {p: make(p) for p in model.parameters()}

    def step_in_backward(p):
        optimizers[p].step()
        optimizers[p].zero_grad(set_to_none=True)
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(step_in_backward)
    forward_backward = plain_step(model, fixed_batch(cfg, row["res"], row.get("text", TEXT), device), device)
    setup = peak_gib(device)
    seconds, losses = timed_loop(forward_backward, row["warmup"], row["steps"], device, row.get("profile", 0),
                                 row["name"])
    return {"s_per_step": seconds, "losses": losses, "setup_gib": setup,
            "trainable": sum(p.numel() for p in model.parameters())}


def save_random_weights(folder: Path, cfg: dict, device) -> None:
    """Random weights of the real shapes in diffusers' transformer layout (bf16), for the load rows."""
    if (folder / "config.json").is_file():
        return
    model = bf16_model(cfg, device)
    model.save_pretrained(str(folder), max_shard_size="5GB")
    del model
    torch.cuda.empty_cache()


def run_trainer(row: dict, device, cache: Path, work: Path) -> dict:
    from train.config import load_config
    from train.loop import Trainer
    from train.records import read_records
    settings = {"data.train_cache": str(cache), "data.batch_size": row.get("batch", 1), "data.num_workers": 2,
                "data.shuffle_buffer": 4, "model.name": "tiny" if row.get("tiny") else "flux-dev",
                "model.overrides": row.get("overrides", {}), "run.grad_checkpointing": True,
                "run.output_dir": str(work / "run"), "run.tensorboard": False, "run.progress": False,
                "run.save_final": False, "flow.guidance_dropout": 0.1, "run.seed": 0,
                "run.max_steps": row["warmup"] + row["steps"], "run.log_every": row.get("log_every", 1),
                # random weights of the real shapes (the load rows read them from disk), a LoRA's base too
                "model.init": "random", "lora.allow_random_base": True, **row["config"]}
    if row.get("load"):
        folder = work.parent / "weights"
        save_random_weights(folder, model_config(row), device)
        settings.update({"model.name": str(folder), "model.init": "pretrained", "model.overrides": {}})
        reset_peak(device)
    if "group_elements" in row:   # the in-backward step groups' size (1: one parameter a step)
        import train.optim
        train.optim.GROUP_ELEMENTS = row["group_elements"]
    trainer = Trainer(load_config(None, settings))
    setup = peak_gib(device)
    if not row.get("load"):
        reset_peak(device)
    clock = StepClock(row["warmup"], row["name"] if row.get("profile") else None)
    trainer.train(on_batch=clock)
    seconds = clock.stop(row["steps"])
    records = read_records(work / "run")   # metrics.jsonl with timings.jsonl's data_wait joined in
    steps = [r for r in records if "loss" in r]
    timed = [r for r in steps if r["step"] > row["warmup"]]
    model = trainer.accelerator.unwrap_model(trainer.model)
    return {"s_per_step": seconds, "losses": [r["loss"] for r in steps], "setup_gib": setup,
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "data_wait": sum(r["data_wait"] for r in timed) / max(1, len(timed))}


class StepClock:
    """The trainer's own time per step, warm-up steps left out: called with each batch as the loop takes
    it (grad_accum 1: once per step); after `warmup` steps it syncs and starts the clock. With `profile`
    the last steps of the run run under the profiler."""

    def __init__(self, warmup: int, profile: str | None = None):
        self.warmup, self.batches, self.start = warmup, 0, None
        self.prof = profiler() if profile else None
        self.name = profile

    def __call__(self, batch) -> None:
        self.batches += 1
        if self.batches == self.warmup + 1:
            sync()
            self.start = time.perf_counter()
            if self.prof is not None:
                self.prof.start()

    def stop(self, steps: int) -> float:
        sync()
        seconds = (time.perf_counter() - self.start) / steps
        if self.prof is not None:
            self.prof.stop()
            print_profile(self.prof, self.name)
        return seconds


def flops_per_image(row: dict, lora: bool) -> float:
    from diffusers import FluxTransformer2DModel
    cfg = model_config(row)
    with torch.device("meta"):
        meta = FluxTransformer2DModel(**cfg)
    img = (row["res"] // 16) ** 2
    text = row.get("text", TEXT)
    linear = linear_flops_per_image(meta, img, text) * (4 / 6 if lora else 1)
    return linear + attention_flops_per_image(cfg, img, (img + text) ** 2)


def run_row(row: dict, device, cache: Path | None, work: Path) -> dict:
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)   # its backward crashed under autocast with Flux (torch 2.11)
    if row["kind"] == "plain-lora":
        result = run_plain_lora(row, device)
    elif row["kind"] == "plain-full":
        result = run_plain_full(row, device)
    else:
        result = run_trainer(row, device, cache, work)
    lora = row["kind"] == "plain-lora" or "lora.rank" in row.get("config", {})
    img_s = row.get("batch", 1) / result["s_per_step"]
    peak = PEAK_BF16.get(torch.cuda.get_device_name().split()[1]) if device.type == "cuda" else None
    flops = flops_per_image(row, lora)
    return {**result, "peak_gib": peak_gib(device), "img_s": img_s, "mfu": img_s * flops / peak if peak else None}


def suite_cache(row: dict, root: Path) -> Path:
    """The synthetic cache a row reads (a row of "samples": 1 trains on a fixed batch)."""
    cfg = model_config(row)
    n = row.get("samples", 8)
    text = row.get("text", TEXT)
    dims = {"t5": cfg["joint_attention_dim"], "clip": cfg["pooled_projection_dim"]}
    path, _ = write_cache(root, f"padded-{text}-{row['res']}-{n}", "padded", text, n, row["res"] // 8, dims)
    return path


def run_in_subprocess(row: dict, args, cache: Path, work: Path) -> dict:
    cmd = [sys.executable, __file__, "--row", json.dumps(row), "--device", args.device, "--cache", str(cache),
           "--work", str(work)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.row_timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.row_timeout} s"}
    found = [ln[4:] for ln in done.stdout.splitlines() if ln.startswith("ROW ")]
    if done.returncode != 0 or not found:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        oom = "out of memory" in done.stderr.lower()
        return {"error": "out of memory" if oom else " | ".join(tail)[-300:]}
    return json.loads(found[-1])


def run_in_process(row: dict, args, cache: Path, work: Path) -> dict:
    """For rows that cannot run out of memory (the 2.55B model): no start-up cost per row."""
    import gc

    from accelerate.state import AcceleratorState
    try:
        return run_row(row, torch.device(args.device), cache, work)
    except Exception as e:   # one failed row must not end the others
        return {"error": f"{type(e).__name__}: {e}"[-300:]}
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def compare_smoke(results: list[dict]) -> None:
    """Swapped rows against their plain twins: the losses must agree (to GPU rounding)."""
    by_name = {r["name"]: r for r in results}
    for r in results:
        twin = by_name.get(r.get("same_as"))
        if twin and "losses" in r and "losses" in twin:
            diff = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], twin["losses"]))
            print(f"{r['name']!r} vs {twin['name']!r}: largest relative loss difference {diff:.2e}")


def print_table(results: list[dict]) -> None:
    head = (f"{'row':<40} {'peak GiB':>8} {'setup GiB':>9} {'img/s':>6} {'s/step':>7} {'MFU':>6} "
            f"{'loss first5 -> last5':>21}")
    print("\n" + head + "\n" + "-" * len(head))
    for r in results:
        if "error" in r:
            print(f"{r['name']:<40} {r['error']}")
            continue
        fmt = lambda v, f: format(v, f) if v is not None else "-".rjust(int(f.split(".")[0]))  # noqa: E731
        ls = r["losses"]
        k = min(5, max(1, len(ls) // 2))
        trend = f"{sum(ls[:k]) / k:.3f} -> {sum(ls[-k:]) / k:.3f}"
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        print(f"{r['name']:<40} {fmt(r['peak_gib'], '8.1f')} {fmt(r['setup_gib'], '9.1f')} {r['img_s']:>6.2f} "
              f"{r['s_per_step']:>7.3f} {mfu:>6} {trend:>21}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=["lora", "full", "speed", "fidelity", "smoke"], default="lora")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="smoke suite only: the tiny model (CPU)")
    p.add_argument("--only", default=None, help="row names to run, separated by ; (default: all)")
    p.add_argument("--budget", type=float, default=570, help="seconds: start no row after this")
    p.add_argument("--row-timeout", type=float, default=300)
    p.add_argument("--same-process", action="store_true", help="run the rows in this process (no OOM risk)")
    p.add_argument("--max-errors", type=int, default=2, help="stop the suite after this many failed rows")
    p.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "flux-bench-memory"))
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--row", default=None, help=argparse.SUPPRESS)      # internal: run one row, print it
    p.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.row:
        row = json.loads(args.row)
        result = run_row(row, torch.device(args.device), Path(args.cache), Path(args.work))
        print("ROW " + json.dumps({**row, **result}), flush=True)
        return
    root = Path(args.root)
    chosen = [r for r in rows(args.suite, args.tiny) if not args.only or r["name"] in args.only.split(";")]
    start, results = time.perf_counter(), []
    for i, row in enumerate(chosen):
        failed = sum("error" in r for r in results)
        if time.perf_counter() - start > args.budget or failed >= args.max_errors:
            results.append({"name": row["name"], "error": "not run (time budget or earlier errors)"})
            continue
        cache = suite_cache(row, root / "caches")
        work = root / f"work-{args.suite}-{i}"
        shutil.rmtree(work, ignore_errors=True)
        t0 = time.perf_counter()
        run = run_in_process if args.same_process else run_in_subprocess
        result = {**row, **run(row, args, cache, work)}
        result["wall_s"] = time.perf_counter() - t0
        results.append(result)
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items() if k != "losses"}
        print(json.dumps(shown), flush=True)
    print_table(results)
    compare_smoke(results)
    if args.json:
        Path(args.json).write_text(json.dumps({"suite": args.suite, "device": args.device, "rows": results}, indent=1))


if __name__ == "__main__":
    main()
