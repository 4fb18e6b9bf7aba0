"""The adapter a LoRA run trains (lora.kind, lora.dora), as peft's own config: LoraConfig (B A, or DoRA with
use_dora), LoKrConfig (LyCORIS LoKr: delta = w1 kron w2, w2 of rank lora.rank) or LoHaConfig (LyCORIS LoHa:
delta = (w1_a w1_b) * (w2_a w2_b), element-wise). Each is scaled by lora.alpha / lora.rank and saved, resumed
and sampled through peft's own state dict, in the one file format of train/checkpoint.py (the peft config,
and so the kind, in its metadata)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from shared.params import ConfigError

if TYPE_CHECKING:
    from .config import LoraConfig, TrainConfig

KINDS = ("lora", "lokr", "loha")


def peft_config(cfg: LoraConfig, targets: str):
    """peft's config of the adapter lora.kind / lora.dora describe, on the modules `targets` matches.
    LoRA starts with B = 0 and a gaussian A (as before kinds); LoKr and LoHa with peft's own init, which
    also makes the first delta zero (LoKr's w2, LoHa's w2_b zero)."""
    alpha = cfg.alpha or cfg.rank
    if cfg.kind == "lokr":
        from peft import LoKrConfig
        return LoKrConfig(r=cfg.rank, alpha=alpha, decompose_factor=cfg.lokr_factor, target_modules=targets)
    if cfg.kind == "loha":
        from peft import LoHaConfig
        return LoHaConfig(r=cfg.rank, alpha=alpha, target_modules=targets)
    from peft import LoraConfig as PeftLoraConfig
    return PeftLoraConfig(r=cfg.rank, lora_alpha=alpha, init_lora_weights="gaussian", use_dora=cfg.dora,
                          target_modules=targets)


def validate_adapter(cfg: TrainConfig) -> None:
    """Refuse, before anything is built, the adapter options that do not go together, naming the keys."""
    lora = cfg.lora
    if lora.rank <= 0 and (lora.kind != "lora" or lora.dora):
        raise ConfigError(f"lora.kind {lora.kind} / lora.dora {lora.dora} choose the adapter of a LoRA run: "
                          "set lora.rank > 0")
    if lora.dora and lora.kind != "lora":
        raise ConfigError(f"lora.dora is DoRA, a variant of lora.kind lora; it does not apply to {lora.kind}")
    if lora.lokr_factor != -1 and lora.kind != "lokr":
        raise ConfigError(f"lora.lokr_factor is LoKr's; lora.kind is {lora.kind}")
    if lora.lokr_factor == 0 or lora.lokr_factor < -1:
        raise ConfigError(f"lora.lokr_factor {lora.lokr_factor}: a size > 0, or -1 for the most square split")
    if lora.dora and cfg.model.quantize_base == "nf4":
        # peft's DoRA takes each base weight's norm per row from its dequantize(), which torchao's NF4
        # tensors do not have (int8 and float8 have it)
        raise ConfigError("lora.dora reads the base weights dense (DoRA normalises W + B A per row), which "
                          "model.quantize_base nf4 cannot give: use model.quantize_base int8 or float8 with DoRA")


def adapter_label(cfg: LoraConfig) -> str:
    """The adapter's kind as flux_prep.json records it: lora, dora, lokr or loha."""
    return "dora" if cfg.dora else cfg.kind
