"""T5 encoder forward with fused projections, for encoding many prompts fast.

The same function as transformers' `T5EncoderModel` (FLUX's text_encoder_2), over the same
weights, with less traffic per layer: q/k/v are one matmul, the gated FF's two input projections
are one matmul, attention is one `scaled_dot_product_attention` call with T5's relative position
bias (and the padding mask) as its additive mask, and the position bias is computed once per
length. The layer norms keep T5's numerics (mean square in fp32, cast, then the weight).

Only the encoder's inference forward is covered; `FusedT5Encoder.supports(t5)` says whether a
model's configuration is one it can run (gated GELU/ReLU FF, as T5 v1.1 and FLUX's T5-XXL).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# How attention runs: sdpa (eager; under torch.compile it became unfused math), flex (compiled
# flex attention), efficient / cudnn (the memory-efficient or cuDNN SDPA kernel named directly;
# CUDA only, sdpa elsewhere), auto (flex from FLEX_MIN_LENGTH tokens, efficient below; sdpa off
# CUDA). bench/t5_attention.py measures each kernel, bench/encode.py --compile each in T5.
ATTENTION = ("sdpa", "flex", "efficient", "cudnn", "auto")
# Flex attention is the faster kernel at long text, the memory-efficient one at short text
# (bench/t5_attention.py; the figures are in docs/BENCHMARKS.md, run E).
FLEX_MIN_LENGTH = 128
ACTIVATIONS = {"gelu_new": lambda x: F.gelu(x, approximate="tanh"),
               "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
               "gelu": F.gelu, "relu": F.relu}


class FusedT5Encoder(nn.Module):
    """Built from a transformers T5EncoderModel (weights copied in fused form); call it as the
    original: `encoder(input_ids, attention_mask=None)[0]` is the last hidden state."""

    @staticmethod
    def supports(t5) -> bool:
        cfg = t5.config
        return bool(getattr(cfg, "is_gated_act", False)) and cfg.dense_act_fn in ACTIVATIONS

    def __init__(self, t5, release_source: bool = False, attention: str = "sdpa"):
        """`release_source`: free each source projection once copied (the source model can then no
        longer run; saves T5-XXL's 6 GB of q/k/v/wi weights while both exist). `attention`: one of
        ATTENTION; sdpa for eager runs, the others meant for torch.compile."""
        super().__init__()
        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION)}, not {attention!r}")
        self.attention = attention
        if not self.supports(t5):
            raise ValueError(f"FusedT5Encoder runs gated {sorted(ACTIVATIONS)} feed-forwards only, "
                             f"not {t5.config.dense_act_fn!r} (is_gated_act={t5.config.is_gated_act})")
        cfg = t5.config
        self.config = cfg
        self.heads, self.head_dim, self.eps = cfg.num_heads, cfg.d_kv, cfg.layer_norm_epsilon
        self.act = ACTIVATIONS[cfg.dense_act_fn]
        enc = t5.encoder
        self.embed = enc.embed_tokens
        self.position = enc.block[0].layer[0].SelfAttention   # holds relative_attention_bias and compute_bias
        self.attn_norm, self.qkv, self.out, self.ff_norm, self.ff_in, self.ff_out = (nn.ParameterList() for _ in range(6))
        with torch.no_grad():
            for block in enc.block:
                attn, ff = block.layer[0], block.layer[-1].DenseReluDense
                self.attn_norm.append(attn.layer_norm.weight)
                sa = attn.SelfAttention
                self.qkv.append(nn.Parameter(torch.cat([sa.q.weight, sa.k.weight, sa.v.weight]), requires_grad=False))
                self.out.append(sa.o.weight)
                self.ff_norm.append(block.layer[-1].layer_norm.weight)
                self.ff_in.append(nn.Parameter(torch.cat([ff.wi_0.weight, ff.wi_1.weight]), requires_grad=False))
                self.ff_out.append(ff.wo.weight)
                if release_source:
                    for lin in (sa.q, sa.k, sa.v, ff.wi_0, ff.wi_1):
                        lin.weight = nn.Parameter(lin.weight.new_empty(0), requires_grad=False)
        self.final_norm = enc.final_layer_norm.weight
        self._bias: dict = {}

    @property
    def device(self) -> torch.device:
        return self.final_norm.device

    @property
    def dtype(self) -> torch.dtype:
        return self.final_norm.dtype

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # T5LayerNorm: no mean, no bias; mean square in fp32, cast to the weight's dtype, then scale.
        return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(weight.dtype)

    def position_bias(self, length: int) -> torch.Tensor:
        """[1, heads, length, length] relative position bias, computed once per length."""
        key = (length, self.device, self.dtype)
        if key not in self._bias:
            with torch.no_grad():
                self._bias[key] = self.position.compute_bias(length, length, self.device).to(self.dtype)
        return self._bias[key]

    def position_table(self, length: int) -> torch.Tensor:
        """[heads, 2 * length - 1]: T5's position bias by key - query distance (entry d + length - 1),
        which is all it depends on. Flex attention looks it up per score: 64 heads x 511 values stay in
        cache where the full [heads, L, L] bias (8 MB at 256 tokens) would be gathered from memory."""
        key = ("table", length, self.device, self.dtype)
        if key not in self._bias:
            bias = self.position_bias(length)[0]
            distance = torch.arange(1 - length, length, device=bias.device)
            self._bias[key] = bias[:, (-distance).clamp(min=0), distance.clamp(min=0)].contiguous()
        return self._bias[key]

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_ignored):
        x, length = self.embed(input_ids), input_ids.shape[1]
        flex = self.kernel(length, x.device) == "flex"
        bias, key_pad = (self.position_table(length) if flex else self.position_bias(length)), None
        if attention_mask is not None:   # padding keys get the dtype's lowest value, as transformers does
            key_pad = (1.0 - attention_mask.to(x.dtype)) * torch.finfo(x.dtype).min
            if not flex:
                # T5's additive mask, built here rather than inside a compiled `blocks`: there, inductor
                # gave the sum a layout the memory-efficient kernel refused ("last dimension must be
                # contiguous", H100, torch 2.11).
                bias, key_pad = (bias + key_pad[:, None, None, :]).contiguous(), None
        return (self.blocks(x, bias, key_pad),)

    def blocks(self, x: torch.Tensor, bias: torch.Tensor, key_pad: torch.Tensor | None) -> torch.Tensor:
        """Embedded tokens [B, L, D], additive attention bias [1 or B, H, L, L] (position bias, plus
        the padding where `forward` added it; for flex attention the [H, 2L - 1] `position_table`),
        additive key padding [B, L] or None (flex attention only) -> last hidden state. The part
        worth compiling: no Python state, static shapes per length."""
        b, length = x.shape[:2]
        attend = self._attention(bias, key_pad, b, length)
        for i in range(len(self.qkv)):
            h = self._norm(x, self.attn_norm[i])
            q, k, v = (_linear(h, self.qkv, i).view(b, length, 3, self.heads, self.head_dim)
                       .permute(2, 0, 3, 1, 4).unbind(0))
            a = attend(q, k, v)
            x = _clamp_fp16(x + _linear(a.transpose(1, 2).reshape(b, length, -1), self.out, i))
            gate, lin = _linear(self._norm(x, self.ff_norm[i]), self.ff_in, i).chunk(2, dim=-1)
            x = _clamp_fp16(x + _linear(self.act(gate) * lin, self.ff_out, i))
        return self._norm(x, self.final_norm)

    def to_float8(self, wo: bool = False) -> int:
        """q/k/v, the attention output and the FF's fused input projections (and its output `wo`, where asked)
        as Float8FrozenLinear layers (shared/text_float8.py says why `wo` stays); returns how many layers."""
        from .float8 import Float8FrozenLinear
        kinds = ("qkv", "out", "ff_in") + (("ff_out",) if wo else ())
        count = 0
        for kind in kinds:
            weights = getattr(self, kind)
            if isinstance(weights, nn.ParameterList) and all(w.shape[0] % 16 == 0 and w.shape[1] % 16 == 0
                                                             for w in weights):
                setattr(self, kind, nn.ModuleList(Float8FrozenLinear.from_weight(w) for w in weights))
                count += len(weights)
        return count

    def kernel(self, length: int, device: torch.device) -> str:
        """The attention kernel at this text length: `attention`, with auto resolved."""
        if self.attention != "auto":
            return self.attention
        if device.type != "cuda":
            return "sdpa"
        return "flex" if length >= FLEX_MIN_LENGTH else "efficient"

    def _attention(self, bias, key_pad, b: int, length: int):
        """attend(q, k, v) for every layer, with what it needs built once per forward (not per layer)."""
        kernel = self.kernel(length, bias.device)
        if kernel == "flex":
            return lambda q, k, v: _flex(q, k, v, bias, key_pad)
        # `bias` is T5's whole additive mask: position bias, plus the lowest value at padding keys.
        if kernel in ("efficient", "cudnn") and bias.device.type == "cuda" and length % 16 == 0:
            # An SDPA kernel named directly: under torch.compile, SDPA with an additive mask was
            # lowered to unfused math (the scores materialized in memory). The
            # kernels run on CUDA, with bias rows 16-element aligned.
            mask = bias.expand(b, self.heads, length, length)
            if kernel == "cudnn":
                return lambda q, k, v: torch.ops.aten._scaled_dot_product_cudnn_attention(
                    q, k, v, mask, False, scale=1.0)[0]
            return lambda q, k, v: torch.ops.aten._scaled_dot_product_efficient_attention(
                q, k, v, mask, False, scale=1.0)[0]
        # T5 does not scale its attention scores.
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)


# Flex attention's tile for T5's heads (64 dims), faster than its default tile (bench/t5_attention.py;
# docs/BENCHMARKS.md, run E).
FLEX_KERNEL_OPTIONS = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}


def _flex(q, k, v, table, key_pad, kernel_options: dict | None = FLEX_KERNEL_OPTIONS):
    # Flex attention adds the bias inside one fused kernel; its eager form is a slow reference, so
    # it is meant for torch.compile. `table`: position_table, indexed by key - query distance.
    # `kernel_options` (CUDA, 64-dim heads): None leaves flex its default tile.
    from torch.nn.attention.flex_attention import flex_attention
    offset = q.shape[2] - 1
    if key_pad is None:
        def score_mod(score, b, h, q_idx, kv_idx):
            return score + table[h, kv_idx - q_idx + offset]
    else:
        def score_mod(score, b, h, q_idx, kv_idx):
            return score + table[h, kv_idx - q_idx + offset] + key_pad[b, kv_idx]
    options = kernel_options if q.is_cuda and q.shape[-1] == 64 else None
    return flex_attention(q, k, v, score_mod=score_mod, scale=1.0, kernel_options=options)


def _linear(x: torch.Tensor, layers: nn.Module, i: int) -> torch.Tensor:
    """Layer i of a projection kind: a bf16 weight (ParameterList) or a float8 layer (ModuleList, to_float8)."""
    if isinstance(layers, nn.ParameterList):
        return F.linear(x, layers[i])
    return layers[i](x)


def _clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    """transformers' T5 clamps fp16 activations short of inf (T5 overflows fp16); other dtypes pass."""
    if x.dtype != torch.float16:
        return x
    top = torch.finfo(torch.float16).max
    limit = torch.where(torch.isinf(x).any(), top - 1000, top)
    return x.clamp(-limit, limit)
