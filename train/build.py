"""The transformer as the trainer trains it: built or loaded in its weights' dtype, placed block by block
(quantized, or left in host memory for the block offloader), with the adapter, float8, flex-attention
masking, activation checkpointing and torch.compile, in that order."""
from __future__ import annotations

import torch

from shared.family import Family
from shared.float8 import freeze_to_float8
from shared.models import ModelLoadError

from .config import TrainConfig
from .model import (add_lora, build_transformer, check_cache_fits, convert_to_float8, place, use_flex_attention,
                    weights_dtype)
from .offload import BlockOffloader, spread


def flex_mask_wanted(cfg: TrainConfig, device: torch.device, text_mode: str) -> bool:
    """Whether trimmed text's padding is masked through flex attention (run.masked_attention)."""
    masking = cfg.run.masked_attention
    if masking == "auto":   # flex attention is fast compiled on CUDA only
        masking = "flex" if device.type == "cuda" and cfg.run.compile else "sdpa"
    if masking == "flex" and device.type != "cuda":
        raise ModelLoadError("run.masked_attention flex needs a CUDA device (flex attention has no CPU backward)")
    # Only trimmed caches have text padding to mask; padded text keeps the flash kernel.
    return masking == "flex" and text_mode == "trimmed"


def build_model(cfg: TrainConfig, family: Family, device: torch.device, reader, *, fsdp: bool, flex_mask: bool):
    """The model and its block offloader (None without run.offload_blocks); `reader`: the training cache,
    whose latents and text the model must fit."""
    run, lora = cfg.run, cfg.lora.rank > 0
    # FSDP shards the weights after prepare(): build on the host there, on the device otherwise.
    model = build_transformer(cfg.model, seed=run.seed, device="cpu" if fsdp else device, dtype=weights_dtype(cfg))
    check_cache_fits(model, family, reader)
    blocks = family.blocks(model)
    offloaded = spread(run.offload_blocks, len(blocks))
    if not fsdp:
        place(model, family, device, cfg.model.quantize_base, host_blocks=set(offloaded))
    if lora:
        add_lora(model, cfg.lora, family)
    offloader = BlockOffloader(blocks, offloaded, device, move_trainable=not lora) if offloaded else None
    if run.precision == "fp8" and lora:   # the frozen base computes in float8 under the fp32 adapter
        freeze_to_float8(model, family)
    elif run.precision == "fp8":
        convert_to_float8(model, family)
    if flex_mask:
        use_flex_attention(model)
    if run.grad_checkpointing:
        model.enable_gradient_checkpointing()
    if run.compile:
        # Static shapes: inductor's dynamic-shape backward failed on Flux blocks when the text
        # length changed (torch 2.11, H100). Each (batch, text length) compiles once instead;
        # collate() keeps the lengths few, and the cache limit leaves room for them all.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        model.compile_repeated_blocks(fullgraph=False, dynamic=False)
    return model, offloader
