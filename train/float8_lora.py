"""run.precision fp8 under a LoRA: the frozen base stored and computed in float8 (shared/float8.py), the
adapter in fp32 on top. What cannot go with it is refused here, before anything is built."""
from __future__ import annotations

from shared.params import ConfigError


def validate_fp8_lora(cfg) -> None:
    """Refuse, before anything is built, what cannot go with a float8 base (config.validate calls this)."""
    if cfg.model.quantize_base != "none":
        raise ConfigError(f"run.precision fp8 with LoRA stores and computes the frozen base in float8; "
                          f"model.quantize_base {cfg.model.quantize_base} quantizes it another way: set "
                          "model.quantize_base none, or run.precision bf16")
    if cfg.lora.dora:
        raise ConfigError("lora.dora normalises W + B A per row from the base weights read dense, which "
                          "run.precision fp8 stores in float8 under one scale: use run.precision bf16 with DoRA")
    if cfg.run.offload_blocks:
        raise ConfigError("run.precision fp8 with LoRA and run.offload_blocks cannot be combined yet (the "
                          "block swap moves bf16 weights): set run.offload_blocks 0, or run.precision bf16")
