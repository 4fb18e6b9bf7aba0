"""Issue 29's rows of bench/memory.py (FLUX.1 [dev] 12B shapes, random init, one GPU): the LoRA's speed with
float8 compute and run.compile (`--suite lora`), and full-weight training at a batch that fills the card
(`--suite mfu`), each beside a plain loop measured in the same call. `profile:` rows run three timed steps
under torch.profiler and write their tables into BENCH_PROFILE_DIR.

    python3 bench/memory.py --suite mfu --budget 560       # full weights at 512px, batch 16: MFU >= 40%
"""
from __future__ import annotations

MFU_BATCH = 16   # 512px full-weight rows: 22 GiB of bf16 weights + about 1.3 GiB of checkpointed activations a sample


def lora_speed_rows(base: dict, lora: dict) -> list[dict]:
    """The 12B LoRA's speed: the plain loop, the trainer's bf16 base, float8 compute under the adapter
    (run.precision fp8: the frozen base stored and multiplied in float8), each with and without
    run.compile. Goals: fp8 compiled >= 1.5x the plain loop's img/s at <= 16 GiB, bf16 compiled >= 1.2x."""
    plain = "plain loop, bf16 base"
    fp8 = {**lora, "run.precision": "fp8"}
    compiled = {"run.compile": True}
    profile = {"warmup": 3, "steps": 3, "profile": True, "est_s": 120}
    return [{**base, "kind": "plain-lora", "name": plain, "est_s": 60},
            {**base, "kind": "trainer", "name": "bf16 base", "config": lora, "goal": {"img_s_of": plain},
             "est_s": 60},
            {**base, "kind": "trainer", "name": "fp8 compute", "config": fp8, "goal": {"img_s_of": plain},
             "est_s": 60},
            {**base, "kind": "trainer", "name": "fp8 compute, compile", "config": {**fp8, **compiled},
             "goal": {"img_s_of": plain, "img_s_factor": 1.5, "peak_gib": 16}, "est_s": 120},
            {**base, "kind": "trainer", "name": "bf16 base, compile", "config": {**lora, **compiled},
             "goal": {"img_s_of": plain, "img_s_factor": 1.2}, "est_s": 120},
            {**base, **profile, "kind": "trainer", "name": "profile: fp8 compute, compile",
             "config": {**fp8, **compiled}},
            {**base, **profile, "kind": "trainer", "name": "profile: bf16 base, compile",
             "config": {**lora, **compiled}},
            # diagnostics (shared/float8.py's switches): does the backward's per-call weight transpose, or its
            # exact accumulation, cost the time the float8 step loses?
            {**base, "kind": "trainer", "name": "diagnostic: fp8 compute, compile, transposed weights kept",
             "config": {**fp8, **compiled}, "float8_switches": {"KEEP_TRANSPOSED": True}, "est_s": 120},
            {**base, "kind": "trainer", "name": "diagnostic: fp8 compute, compile, fast accumulation in the backward",
             "config": {**fp8, **compiled}, "float8_switches": {"GRAD_FAST_ACCUM": True}, "est_s": 120}]


def mfu_rows(full: dict, batch: int = MFU_BATCH) -> list[dict]:
    """Full weights at 512px and `batch` images a step (a fixed batch of `batch` cached samples): the trainer
    (its in-backward optimizer stepping a block's weights in groups, with run.compile; Adafactor's step compiled,
    optim.fused) beside the plain loop of
    one optimizer per parameter stepped in its post-accumulate-grad hook, Adafactor and AdamW8bit.
    Goal: MFU >= 40% (issue 29)."""
    base = {"res": 512, "warmup": 3, "steps": 10, "batch": batch, "samples": batch, "log_every": 1}
    out = []
    for optim in ("adafactor", "adamw8bit"):
        plain = f"plain loop, {optim}, batch {batch}"
        config = {**full, "optim.name": optim, "run.compile": True, "optim.fused": optim == "adafactor"}
        out += [{**base, "kind": "plain-full", "name": plain, "optim": optim, "est_s": 100},
                {**base, "kind": "trainer", "name": f"{optim}, batch {batch}, compile", "config": config,
                 "goal": {"img_s_of": plain, "mfu": 0.40}, "est_s": 150}]
    return out
