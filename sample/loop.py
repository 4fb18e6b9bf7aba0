"""The sampler's speed options. The denoising loop itself is shared/sampling.py (the trainer's sample
images run it too)."""
from __future__ import annotations

import torch


def configure_speed(transformer, *, compile_blocks: bool = False, attention_backend: str = "default",
                    cudnn_sdpa: bool = True, fuse_qkv: bool = False, mode: str | None = None,
                    compile_backend: str = "inductor", float8_family=None):
    """The project's fast path: an attention backend for every block, q/k/v fused into one GEMM,
    torch.compile per repeated block (regional compilation: each FluxTransformerBlock /
    FluxSingleTransformerBlock compiled once, its graph reused for all 19/38 blocks, so compile time
    stays in seconds), and optionally cuDNN SDPA off (it crashed under autocast on torch 2.11+cu130
    in the trainer's backward). `float8_family` given (flux-sample --precision fp8): the token-wise linear
    layers compute in float8 by that family's rule (shared/float8.py), converted after the fusion (which
    concatenates bf16 weights; fused q/k/v then share one float8 scale) and before the compilation."""
    if not cudnn_sdpa and hasattr(torch.backends.cuda, "enable_cudnn_sdp"):
        torch.backends.cuda.enable_cudnn_sdp(False)
    if fuse_qkv:
        transformer.fuse_qkv_projections()
    if attention_backend != "default":
        transformer.set_attention_backend(attention_backend)
    if float8_family is not None:
        from shared.float8 import freeze_to_float8
        freeze_to_float8(transformer.requires_grad_(False), float8_family)
    if compile_blocks:
        # All 57 blocks share one forward; give dynamo room for their guards without falling back to eager.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
        for block in blocks:
            block.compile(fullgraph=True, dynamic=False, mode=mode, backend=compile_backend)
    return transformer
