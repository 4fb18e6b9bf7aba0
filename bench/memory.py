"""Memory and speed of the FLUX transformers in training on one GPU: plain loops beside the trainer.

FLUX.2 ([klein] 4B / 9B, [dev] 32B; rows in bench/memory_flux2.py), every row on one H100 or H200, in
calls of at most 10 minutes: run this same command again until it no longer says "row(s) not run yet"
(about 3 calls; each keeps what the earlier ones finished under --root). Where the machine was given back
in between, copy the last call's results.json (from its $OUT) into a carried folder and add
`--resume-from that/results.json`. The wheels of diffusers, peft and torchao travel in .whl:

    [ -d /tmp/site/diffusers ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target /tmp/site .whl/*.whl; export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1; \
    python3 bench/memory.py --family flux2 --suite all --resume --budget 500 --max-errors 6

Each row prints a JSON line when it ends; $OUT gets rows/NN-<row>.json per row, results.json (every row so
far, rewritten after each) and table.txt (peak GiB, img/s, MFU, host GiB, the row's goal and whether it
was met). Expected wall time per row on an H100 (process start, model build, steps; a guess until
measured, used to decide whether a row still fits a call's --budget), 22 minutes in all:

     35 s  klein-4B LoRA: plain loop, bf16 base (diffusers + peft, FLUX.2's LoRA targets)
     40 s  klein-4B LoRA: trainer, bf16 base                 goal: img/s >= the plain loop's
     45 s  klein-4B LoRA: trainer, fp8 compute               goal: img/s >= 1.5x the plain loop's, <= 6 GiB
  2x 45 s  klein-4B LoRA: trainer, int8 / float8 base        goal: <= 6 GiB
     45 s  klein-9B LoRA: plain loop, bf16 base
     60 s  klein-9B LoRA: trainer, int8 base                 goal: <= 11 GiB
     90 s  dev LoRA: trainer, float8 base                    goal: <= 38 GiB
    100 s  dev LoRA: trainer, nf4 base                       goal: <= 22 GiB
    120 s  dev LoRA: trainer, bf16 base, all 56 blocks swapped   goal: <= 12 GiB
     70 s  dev LoRA: plain loop, bf16 base (64.4 GB of weights + ~7 GB of activations: fits 80 GB, or OOM)
  45+60 s  klein-4B / 9B full: plain loop, Adafactor per parameter in the backward
  50+70 s  klein-4B / 9B full: trainer, Adafactor in backward    goal: <= 12 / 22 GiB, img/s >= plain
     90 s  klein-4B encode, plain Flux2KleinPipeline loop (builds the random Qwen3-4B + VAE folder, 8 GB)
     60 s  klein-4B encode, flux-prep Encoders                    goal: img/s >= plain
    150 s  stretch: dev full weights at 512px, bf16 weights on the host, all blocks swapped, Adafactor
           (both swapped dev rows pin ~92 GiB of host memory: torch rounds each pinned buffer up to a power
           of two, 58.5 GiB of blocks become 92 of the host's ~119 GiB)
     60 s  dev encode: the Mistral 24B text encoder alone, flux-prep's text path (no folder)
     70 s  dev LoRA: trainer, bf16 base                      goal: img/s >= dev's plain loop

FLUX.2's rows are of the kinds below at batch 1, text padded to 512 (all of it attended), 1024px unless
said: the plain loops on diffusers' Flux2Transformer2DModel, their inputs made by Flux2KleinPipeline's own
helpers (_pack_latents, _prepare_latent_ids, _prepare_text_ids), peft's LoRA on FLUX2.default_lora_targets
(the trainer's); the trainer on a synthetic FLUX.2 cache (bench/train_data.py write_flux2_cache).
Encode rows time a batch of 8 images and captions to host tensors (img/s, then the text encoder and the
VAE alone): `encode-plain` Flux2KleinPipeline.encode_prompt + vae.encode, `encode-project`
preprocess.encode.Encoders, both on one folder written on the device (random Qwen3-4B and FLUX.2 VAE of
their real configs, the offline byte-level tokenizer of shared/tiny_flux2.py); `encode-text` [dev]'s
Mistral 24B decoder alone. The host GiB column is the process's peak RSS (pinned swap buffers included).
`--family flux2 --suite all --device cpu --tiny` runs every row at toy size (tests/test_bench_flux2.py).

FLUX.1 [dev] (12B), the suites below, one call each:

    python bench/memory.py --suite lora       # LoRA rank 16 at 1024px: baseline, bf16/8-bit/nf4 bases, block swap
    python bench/memory.py --suite lora --budget 500 \
        --only "plain loop, bf16 base;bf16 base;fp8 compute;fp8 compute, compile;bf16 base, compile"
                                              # float8 compute under the adapter, run.compile (issue 29)
    python bench/memory.py --suite full       # full-weight training at 512px: adamw8bit, Adafactor, block swap
    python bench/memory.py --suite speed      # the full-weight rows' speed: trainer and plain loops taking turns
    python bench/memory.py --suite mfu        # full weights at 512px, batch 16, compiled: MFU (bench/memory_speed.py)
    python bench/memory.py --suite fidelity   # the reduced 2.55B model, 200 steps: 8-bit bases and optimizers
    python bench/memory.py --suite smoke      # a small model on the GPU: every path runs, block swap is exact
    python bench/memory.py --suite smoke --device cpu --tiny    # the same on a CPU, tiny model (a minute)
    python bench/memory.py --suite lora --device cpu --tiny     # the lora suite's speed rows, tiny (compile: skipped)
    python bench/memory.py --suite edit --budget 480            # Kontext LoRA with one 1024px reference (issue 27)
    python bench/memory.py --family flux2 --suite edit --budget 480   # [klein] 4B LoRA with two references

The edit suites' rows are in bench/memory_edit.py (the sequence doubles for Kontext: 4096 + 4096 image
tokens + 512 text; the plain loop's inputs as FluxKontextPipeline makes them; the trainer on a synthetic
cache with the references in its ref{i}_* columns).

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
import contextlib
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
# Its siblings (flops, train_data, memory_flux2) where this file is loaded by path (tests): appended, so that
# bench/sample.py never shadows the `sample` package.
if str(REPO / "bench") not in sys.path:
    sys.path.append(str(REPO / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import memory_edit  # noqa: E402 - beside this file
import memory_flux2  # noqa: E402 - beside this file
from memory_speed import lora_speed_rows, mfu_rows  # noqa: E402 - beside this file
import torch  # noqa: E402
from flops import PEAK_BF16, attention_flops_per_image, linear_flops_per_image  # noqa: E402 - beside this file
from train_data import write_cache, write_flux2_cache  # noqa: E402 - beside this file

from shared.cache.references import reference_count  # noqa: E402
from shared.family import get_family  # noqa: E402
from shared.presets import transformer_config  # noqa: E402

TEXT = 512
REDUCED = {"num_layers": 4, "num_single_layers": 8}     # the 2.55B model of bench/train.py
SMOKE = {"num_layers": 2, "num_single_layers": 4}


def rows(suite: str, tiny: bool, family: str = "flux1") -> list[dict]:
    if suite == "edit":   # LoRA with reference images: Kontext (flux1), [klein] 4B (flux2)
        return memory_edit.rows(family, tiny)
    if family == "flux2":
        return memory_flux2.rows(suite, tiny)
    lora = {"lora.rank": 16, "run.precision": "bf16", "optim.lr": 1e-4}
    full = {"model.weights_dtype": "bf16", "run.precision": "bf16", "optim.in_backward": True,
            "optim.grad_clip": 0.0, "optim.lr": 1e-5}
    if suite == "lora":
        base = {"res": 1024, "warmup": 3, "steps": 10}
        speed = lora_speed_rows(base, lora)
        if tiny:   # the speed rows at toy size (the 8-bit bases and block swap: the smoke suite)
            return [{**r, "tiny": True, "res": 64, "text": 32, "warmup": 1, "steps": 2, "est_s": 0} for r in speed]
        return [*speed,
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
    if suite == "mfu":   # full weights at a batch that fills the card (issue 29)
        return mfu_rows(full)
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
                {**base, "kind": "trainer", "name": "adamw8bit", "config": {**full, "optim.name": "adamw8bit"}},
                # Adafactor's step compiled per weight shape (optim.fused, train/adafactor.py): fewer host calls
                {**base, "kind": "trainer", "name": "adafactor, compiled step",
                 "config": {**adafactor, "optim.fused": True}}]
    if suite == "fidelity":
        base = {"res": 256, "warmup": 0, "steps": 200, "overrides": REDUCED, "batch": 2, "log_every": 1,
                "text": 256, "samples": 64}
        lora_f = {**lora, "optim.lr": 1e-3}
        return [{**base, "kind": "trainer", "name": "LoRA, bf16 base", "config": lora_f},
                *[{**base, "kind": "trainer", "name": f"LoRA, {q} base",
                   "config": {**lora_f, "model.quantize_base": q}} for q in ("int8", "float8", "nf4")],
                {**base, "kind": "trainer", "name": "LoRA, fp8 compute", "same_as": "LoRA, bf16 base",
                 "config": {**lora_f, "run.precision": "fp8"}},
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
    return transformer_config(preset_name(row), **row.get("overrides", {}))


def preset_name(row: dict) -> str:
    return row.get("preset") or ("tiny" if row.get("tiny") else "flux-dev")


def row_family(row: dict):
    return get_family(row.get("family", "flux1"))


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_gib(device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def bf16_model(cfg: dict, device, family=None):
    """The family's diffusers transformer class (FluxTransformer2DModel, Flux2Transformer2DModel), built in bf16
    directly on the device."""
    cls = (family or get_family("flux1")).transformer_cls()
    with memory_flux2.built_in(device, torch.bfloat16):
        return cls(**cfg)


def fixed_batch(cfg: dict, res: int, text: int, device, family: str = "flux1") -> dict:
    if family == "flux2":
        return memory_flux2.fixed_batch(cfg, res, text, device)
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
        pred = pred[:, :batch["target"].shape[1]]   # the noisy tokens' prediction: reference tokens follow them
        loss = torch.nn.functional.mse_loss(pred.float(), batch["target"])
        loss.backward()
        return loss.detach()
    return forward_backward


def run_plain_lora(row: dict, device) -> dict:
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    family = row_family(row)
    cfg = model_config(row)
    model = bf16_model(cfg, device, family)
    model.requires_grad_(False)
    # the trainer's default targets (a regex of module names), the family's attention and MLP projections
    model.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian",
                                 target_modules=family.default_lora_targets))
    cast_training_params(model, dtype=torch.float32)
    model.enable_gradient_checkpointing()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    forward_backward = plain_step(model, plain_batch(row, cfg, device), device)

    def step():
        loss = forward_backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    setup = peak_gib(device)
    seconds, losses = timed_loop(step, row["warmup"], row["steps"], device)
    return {"s_per_step": seconds, "losses": losses, "setup_gib": setup, "trainable": sum(p.numel() for p in params)}


def plain_batch(row: dict, cfg: dict, device) -> dict:
    if row.get("refs"):
        return memory_edit.fixed_batch(cfg, row, row.get("text", TEXT), device)
    batch = fixed_batch(cfg, row["res"], row.get("text", TEXT), device, row.get("family", "flux1"))
    return {k: v if v is None or k.endswith("_ids") else v.expand(row.get("batch", 1), *v.shape[1:]).contiguous()
            for k, v in batch.items()}


def run_plain_full(row: dict, device) -> dict:
    cfg = model_config(row)
    model = bf16_model(cfg, device, row_family(row))
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
    forward_backward = plain_step(model, plain_batch(row, cfg, device), device)
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


def trainer_settings(row: dict, cache: Path, work: Path) -> dict:
    """The trainer config of a trainer row (dotted keys, as `train` takes them on its command line)."""
    settings = {"data.train_cache": str(cache), "data.batch_size": row.get("batch", 1), "data.num_workers": 2,
                "data.shuffle_buffer": 4, "model.name": preset_name(row),
                "model.overrides": row.get("overrides", {}), "run.grad_checkpointing": True,
                "run.output_dir": str(work / "run"), "run.tensorboard": False, "run.progress": False,
                "run.save_final": False, "flow.guidance_dropout": 0.1, "run.seed": 0,
                "run.max_steps": row["warmup"] + row["steps"], "run.log_every": row.get("log_every", 1),
                # random weights of the real shapes (the load rows read them from disk), a LoRA's base too
                "model.init": "random", "lora.allow_random_base": True, **row["config"]}
    if "run.offload_blocks" in settings:   # a number, or "all" (FLUX.2's rows)
        settings["run.offload_blocks"] = memory_flux2.offload_count(settings["run.offload_blocks"], model_config(row))
    return settings


def run_trainer(row: dict, device, cache: Path, work: Path) -> dict:
    from train.config import load_config
    from train.loop import Trainer
    from train.records import read_records
    settings = trainer_settings(row, cache, work)
    if row.get("load"):
        folder = work.parent / "weights"
        save_random_weights(folder, model_config(row), device)
        settings.update({"model.name": str(folder), "model.init": "pretrained", "model.overrides": {}})
        reset_peak(device)
    with row_switches(row):
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
            # what the trainer placed: its family, the reference images per sample its cache holds
            "model_family": trainer.family.name, "references": reference_count(trainer.train_reader.manifest),
            "data_wait": sum(r["data_wait"] for r in timed) / max(1, len(timed))}


@contextlib.contextmanager
def row_switches(row: dict):
    """A row's module-level settings, put back after it (rows of one process, --same-process, must not
    inherit them): the in-backward step groups' size (`group_elements`, 1: one parameter a step) and the
    float8 layers' diagnostic switches (`float8_switches`, bench/memory_speed.py)."""
    import shared.float8
    import train.optim
    changes = [(train.optim, "GROUP_ELEMENTS", row["group_elements"])] if "group_elements" in row else []
    changes += [(shared.float8, name, value) for name, value in row.get("float8_switches", {}).items()]
    saved = [(module, name, getattr(module, name)) for module, name, _ in changes]
    for module, name, value in changes:
        setattr(module, name, value)
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


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
    """Model FLOPs of one image's training step (bench/flops.py), the family's transformer on the meta device."""
    family = row_family(row)
    cfg = model_config(row)
    with torch.device("meta"):
        meta = family.transformer_cls()(**cfg)
    img = (row["res"] // 16) ** 2 * (1 + row.get("refs", 0))   # reference tokens, each the target's size
    text = row.get("text", TEXT)
    linear = linear_flops_per_image(meta, img, text, family.per_sample_layer) * (4 / 6 if lora else 1)
    return linear + attention_flops_per_image(cfg, img, (img + text) ** 2)


def run_row(row: dict, device, cache: Path | None, work: Path) -> dict:
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)   # its backward crashed under autocast with Flux (torch 2.11)
    if row["kind"].startswith("encode"):
        return {**run_encode(row, device, work.parent / "models"), **host_memory()}
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
    return {**result, "peak_gib": peak_gib(device), "img_s": img_s, "flops_per_image": flops,
            "mfu": img_s * flops / peak if peak else None, **host_memory()}


def run_encode(row: dict, device, models: Path) -> dict:
    """An encode row (bench/memory_flux2.py): a batch's text and latents; then the text and the VAE alone."""
    models.mkdir(parents=True, exist_ok=True)
    step, text, vae = memory_flux2.ENCODERS[row["kind"]](row, device, models)
    setup = peak_gib(device)
    timed = lambda fn, warmup: timed_loop(lambda: (fn(), 0.0)[1], warmup, row["steps"], device)[0]  # noqa: E731
    seconds = timed(step, row["warmup"])
    peak = peak_gib(device)
    parts = {}
    for part, fn in (("text", text), ("vae", vae)):
        if fn is not None and fn is not step:
            parts[f"{part}_img_s"] = row["batch"] / timed(fn, 1)
    return {"s_per_step": seconds, "img_s": row["batch"] / seconds, "losses": [], "setup_gib": setup,
            "peak_gib": peak, "mfu": None, **parts}


def host_memory() -> dict:
    """The process's host memory now (RSS, pinned buffers included) and its peak, in GiB."""
    import resource

    import psutil
    return {"host_rss_gib": psutil.Process().memory_info().rss / 2**30,
            "host_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def suite_cache(row: dict, root: Path) -> Path | None:
    """The synthetic cache a row reads (a row of "samples": 1 trains on a fixed batch); none for encode rows."""
    if row["kind"].startswith("encode"):
        return None
    cfg = model_config(row)
    n = row.get("samples", 8)
    text = row.get("text", TEXT)
    refs = row.get("refs", 0)   # reference images per row, each of the target's size (the edit suite)
    more = f"-refs{refs}" if refs else ""
    if row.get("family") == "flux2":
        channels = cfg["in_channels"] // 4   # the VAE's latent channels, patchified 2x2 into the transformer's
        return write_flux2_cache(root, f"flux2-{text}-{row['res']}-{n}-{channels}-{cfg['joint_attention_dim']}{more}",
                                 n, row["res"] // 8, channels, cfg["joint_attention_dim"], text, references=refs)
    dims = {"t5": cfg["joint_attention_dim"], "clip": cfg["pooled_projection_dim"]}
    family = row_family(row)
    name = f"padded-{text}-{row['res']}-{n}" + (f"-{family.name}" if family.name != "flux1" else "") + more
    path, _ = write_cache(root, name, "padded", text, n, row["res"] // 8, dims, family=family, references=refs)
    return path


def run_in_subprocess(row: dict, args, cache: Path | None, work: Path, timeout: float) -> dict:
    """The row in a process of its own. `timeout`: the row's limit, or less where the call's budget ends
    sooner (then a row cut short is "not run", for the next call)."""
    cmd = [sys.executable, __file__, "--row", json.dumps(row), "--device", args.device, "--cache", str(cache),
           "--work", str(work)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "not_run": timeout < args.row_timeout}
    found = [ln[4:] for ln in done.stdout.splitlines() if ln.startswith("ROW ")]
    if done.returncode != 0 or not found:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        oom = "out of memory" in done.stderr.lower()
        return {"error": "out of memory" if oom else " | ".join(tail)[-300:]}
    return json.loads(found[-1])


def run_in_process(row: dict, args, cache: Path | None, work: Path) -> dict:
    """For rows that cannot run out of memory (the 2.55B model, the tiny ones): no start-up cost per row."""
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


def goal_status(r: dict, by_name: dict) -> tuple[str, str]:
    """(the row's goal in words, "met" / "MISSED" / "?"): a peak in GiB, at least the img/s of another row
    (by its number in the table) or `img_s_factor` times it, and/or a least MFU."""
    goal, words, verdicts = r.get("goal") or {}, [], []
    failed_here = "error" in r
    if "peak_gib" in goal:
        words.append(f"<={goal['peak_gib']:g} GiB")
        verdicts.append(None if failed_here or r.get("peak_gib") is None else r["peak_gib"] <= goal["peak_gib"])
    if "img_s_of" in goal:
        base, factor = by_name.get(goal["img_s_of"], {}), goal.get("img_s_factor", 1)
        words.append(f">={'' if factor == 1 else f'{factor:g}x'}#{base.get('number', '?')} img/s")
        verdicts.append(None if failed_here or base.get("img_s") is None else r["img_s"] >= factor * base["img_s"])
    if "mfu" in goal:
        words.append(f"MFU>={100 * goal['mfu']:g}%")
        verdicts.append(None if failed_here or r.get("mfu") is None else r["mfu"] >= goal["mfu"])
    if not words:
        return "", ""
    return " ".join(words), "MISSED" if False in verdicts else "?" if None in verdicts else "met"


def format_table(results: list[dict]) -> str:
    by_name = {r["name"]: {**r, "number": i + 1} for i, r in enumerate(results)}
    width = max([40] + [len(r["name"]) for r in results])
    head = (f"{'#':>2} {'row':<{width}} {'peak GiB':>8} {'setup GiB':>9} {'img/s':>6} {'s/step':>7} {'MFU':>6} "
            f"{'host GiB':>8} {'goal':>20} {'':>6} {'loss first5 -> last5':>21}")
    lines = ["", head, "-" * len(head)]
    fmt = lambda v, f: format(v, f) if v is not None else "-".rjust(int(f.split(".")[0]))  # noqa: E731
    for i, r in enumerate(results):
        goal, status = goal_status(r, by_name)
        if "error" in r:
            lines.append(f"{i + 1:>2} {r['name']:<{width}} {r['error']}" + (f"   [goal {goal}]" if goal else ""))
            continue
        ls = r["losses"]
        k = min(5, max(1, len(ls) // 2))
        trend = f"{sum(ls[:k]) / k:.3f} -> {sum(ls[-k:]) / k:.3f}" if ls else "-"
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        lines.append(f"{i + 1:>2} {r['name']:<{width}} {fmt(r['peak_gib'], '8.1f')} {fmt(r['setup_gib'], '9.1f')} "
                     f"{r['img_s']:>6.2f} {r['s_per_step']:>7.3f} {mfu:>6} {fmt(r.get('host_peak_rss_gib'), '8.1f')} "
                     f"{goal:>20} {status:>6} {trend:>21}")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=["flux1", "flux2"], default="flux1",
                   help="flux2: FLUX.2 [klein] 4B / 9B and [dev] (bench/memory_flux2.py)")
    p.add_argument("--suite", choices=["lora", "full", "speed", "mfu", "fidelity", "smoke", "encode", "stretch",
                                        "all", "edit"],
                   default="lora", help="flux1: lora, full, speed, mfu, fidelity, smoke, edit; flux2: lora, full, "
                                        "encode, stretch, all, edit")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="the tiny model (CPU): flux1's smoke suite, lora's "
                                                       "speed rows and edit suite, any flux2 suite")
    p.add_argument("--only", default=None, help="row names to run, separated by ; (default: all)")
    p.add_argument("--budget", type=float, default=570,
                   help="seconds: start no row after this, nor one whose expected time (est_s) would pass it")
    p.add_argument("--row-timeout", type=float, default=300)
    p.add_argument("--same-process", action="store_true", help="run the rows in this process (no OOM risk)")
    p.add_argument("--max-errors", type=int, default=2,
                   help="stop the suite after this many failed rows (out of memory is a result, not a failure)")
    p.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "flux-bench-memory"))
    p.add_argument("--out", default=os.environ.get("OUT"),
                   help="folder for the results as they come: rows/NN-<row>.json when each row ends, results.json "
                        "(every row so far) and table.txt (default: $OUT where set)")
    p.add_argument("--resume", action="store_true",
                   help="keep the rows an earlier call finished (their results under --root) and run the rest: "
                        "a command limited to 10 minutes runs a long suite in several calls")
    p.add_argument("--resume-from", nargs="*", default=None, metavar="RESULTS_JSON",
                   help="also keep the finished rows of these results.json files (an earlier call's --out, "
                        "brought back), where the machine that ran them is gone; implies --resume")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--row", default=None, help=argparse.SUPPRESS)      # internal: run one row, print it
    p.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def finished_rows(args, done: Path) -> dict[str, dict]:
    """Rows an earlier call finished, by name: the results it saved under --root (the machine is the same)
    and the rows of --resume-from files (results.json of an earlier call's --out, for a fresh machine)."""
    found = {}
    for file in args.resume_from or []:
        try:
            earlier = json.loads(Path(file).read_text())["rows"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"--resume-from {file}: not a results.json of this benchmark ({e})") from None
        found.update({r["name"]: r for r in earlier if not r.get("not_run")})
    for file in sorted(done.glob("*.json")) if done.is_dir() else []:
        r = json.loads(file.read_text())
        found[r["name"]] = r
    return found


def row_file(i: int, row: dict) -> str:
    return f"{i + 1:02d}-{re.sub(r'[^A-Za-z0-9]+', '-', row['name']).strip('-')}.json"


def write_json(path: Path, data) -> None:
    """Atomically: a reader (or a call cut off) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def failed(r: dict) -> bool:
    return "error" in r and not r.get("not_run") and not r.get("skipped") and r["error"] != "out of memory"


def device_cannot(row: dict, device: str) -> str | None:
    """Why this device does not run the row: run.compile rows run on CUDA only (inductor's CPU backend
    would build C++ kernels for minutes on a test machine)."""
    if device == "cpu" and row.get("config", {}).get("run.compile"):
        return "run.compile rows run on CUDA only"
    return None


def skip_reason(row: dict, ran: list[dict], args, elapsed: float) -> str | None:
    """Why a row is not started (`ran`: the rows this call ran, the first always runs): too many failures, or
    no time left."""
    if sum(map(failed, ran)) >= args.max_errors:
        return "earlier errors"
    if ran and elapsed + row.get("est_s", 0) > args.budget:
        return "time budget: run the command again with --resume"
    return None


def run_rows(args, chosen: list[dict]) -> list[dict]:
    """Each row in turn (in a process of its own unless --same-process), its result saved as it ends: under
    --root, where --resume finds it (a failed row is not run again: delete its file to retry it), and in --out."""
    root, out = Path(args.root), Path(args.out) if args.out else None
    done = root / f"results-{args.family}-{args.suite}{'-tiny' if args.tiny else ''}"
    finished = finished_rows(args, done) if args.resume or args.resume_from else {}
    start, results, ran = time.perf_counter(), [], []
    for i, row in enumerate(chosen):
        saved = done / row_file(i, row)
        if row["name"] in finished:
            results.append(finished[row["name"]])
            continue
        if device_cannot(row, args.device):
            results.append({**row, "error": f"skipped: {device_cannot(row, args.device)}", "skipped": True})
            continue
        elapsed = time.perf_counter() - start
        reason = skip_reason(row, ran, args, elapsed)
        if reason:
            results.append({**row, "error": f"not run ({reason})", "not_run": True})
            continue
        cache = suite_cache(row, root / "caches")
        work = root / f"work-{args.family}-{args.suite}-{i}"
        shutil.rmtree(work, ignore_errors=True)
        t0 = time.perf_counter()
        if args.same_process:
            result = {**row, **run_in_process(row, args, cache, work)}
        else:
            timeout = min(args.row_timeout, max(30.0, args.budget + 30 - elapsed))
            result = {**row, **run_in_subprocess(row, args, cache, work, timeout)}
        result["wall_s"] = time.perf_counter() - t0
        results.append(result)
        ran.append(result)
        if not result.get("not_run"):
            write_json(saved, result)
            if out:
                write_json(out / "rows" / row_file(i, row), result)
        if out:
            write_json(out / "results.json", {"family": args.family, "suite": args.suite, "rows": results})
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items() if k != "losses"}
        print(json.dumps(shown), flush=True)
    return results


def main(argv=None):
    args = parse_args(argv)
    if args.row:
        row = json.loads(args.row)
        result = run_row(row, torch.device(args.device), Path(args.cache), Path(args.work))
        print("ROW " + json.dumps({**row, **result}), flush=True)
        return
    chosen = [r for r in rows(args.suite, args.tiny, args.family) if not args.only or r["name"] in args.only.split(";")]
    results = run_rows(args, chosen)
    table = format_table(results)
    print(table)
    compare_smoke(results)
    left = sum(1 for r in results if r.get("not_run"))
    if left:
        print(f"{left} row(s) not run yet: the same command with --resume runs them")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "table.txt").write_text(table + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"suite": args.suite, "device": args.device, "rows": results}, indent=1))
    return results


if __name__ == "__main__":
    main()
