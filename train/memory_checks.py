"""The memory options' combinations that cannot work (a quantized or float8 base, block swap, the in-backward
optimizer, compile, samples), refused before anything is built, naming the keys (config.validate calls this)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from shared.params import ConfigError

if TYPE_CHECKING:
    from .config import TrainConfig


def validate_memory_options(cfg: TrainConfig) -> None:
    """Refuse the combinations of the memory options that cannot work, naming the keys."""
    model, optim, run, lora = cfg.model, cfg.optim, cfg.run, cfg.lora.rank > 0
    if lora and run.precision not in ("bf16", "fp8"):
        raise ConfigError(f"LoRA keeps its frozen base in bf16 (or float8), computed under bf16 autocast: set "
                          f"run.precision bf16 or fp8 (not {run.precision!r})")
    if lora and run.precision == "fp8":
        from .float8_lora import validate_fp8_lora
        validate_fp8_lora(cfg)
    if model.quantize_base != "none" and not lora:
        raise ConfigError("model.quantize_base quantizes LoRA's frozen base: it needs lora.rank > 0")
    if model.quantize_base != "none" and run.compile:
        # torch 2.13's AOT autograd refuses torchao's quantized weights saved for the backward ("output aliasing
        # ... subclass outputs"), at the first step: refused here instead
        raise ConfigError(f"model.quantize_base {model.quantize_base} and run.compile cannot be combined yet "
                          "(torch.compile cannot trace torchao's quantized weights through the backward): set "
                          "run.compile false, or for a compiled small base use run.precision fp8 (float8 weights, "
                          "model.quantize_base none)")
    if lora and model.weights_dtype != "fp32":
        raise ConfigError("model.weights_dtype is for full training; a LoRA adapter trains in fp32 on its "
                          "bf16 (or quantized) base")
    if model.weights_dtype == "bf16" and run.precision != "bf16":
        raise ConfigError("model.weights_dtype bf16 needs run.precision bf16 (bf16 autocast)")
    if optim.in_backward and optim.grad_clip > 0:
        raise ConfigError("optim.in_backward steps each parameter as soon as its gradient is complete, before "
                          "the others exist, so the total norm that optim.grad_clip needs is never known: set "
                          "optim.grad_clip 0")
    if optim.in_backward and run.grad_accum > 1:
        raise ConfigError("optim.in_backward frees each gradient right after its step, so run.grad_accum > 1 "
                          "has nothing to accumulate: use a larger data.batch_size")
    if run.offload_blocks < 0:
        raise ConfigError("run.offload_blocks is a number of blocks (0: none)")
    if run.offload_blocks:
        _validate_offload(cfg, lora)


def _validate_offload(cfg: TrainConfig, lora: bool) -> None:
    run = cfg.run
    if not run.grad_checkpointing:
        raise ConfigError("run.offload_blocks needs run.grad_checkpointing true: without it the forward's saved "
                          "activations keep every block's weights on the GPU until the backward")
    if not (lora or cfg.optim.in_backward):
        raise ConfigError("run.offload_blocks with full training needs optim.in_backward true: an offloaded "
                          "block's weights are on the GPU only during its backward, when they must be stepped")
    if cfg.model.quantize_base != "none":
        raise ConfigError("run.offload_blocks and model.quantize_base cannot be combined yet; pick one")
    if run.compile:
        raise ConfigError("run.offload_blocks and run.compile cannot be combined (the swap hooks run between "
                          "the compiled blocks' calls)")
    if cfg.ema.decay > 0 and not lora:
        raise ConfigError("ema.decay with run.offload_blocks in full training is not supported: the EMA would "
                          "need every weight on one device at each update")
