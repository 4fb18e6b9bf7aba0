"""FLUX.1's text encoders: T5-XXL (padded or trimmed) and the pooled output of CLIP-L, loaded once,
encoding captions for the cache, sample prompts and flux-sample alike."""
from __future__ import annotations

import torch

from ..models import load_part, model_identity
from ..text_batch import PromptEncoding, round_up, to_device

# CLIP's input is cut after the pooled token, at a multiple of this (see clip_pooled).
CLIP_CUT_MULTIPLE = 16
# Attention of the compiled fused T5 (shared/t5_fused.py ATTENTION): auto runs flex attention at
# long text (padded-256 and -512) and the memory-efficient kernel at short trimmed text, the faster
# of the two at each (bench/encode.py --t5-attention; docs/BENCHMARKS.md, run E).
COMPILED_T5_ATTENTION = "auto"
# The options `flux-prep encode` passes through to this encoder (EncodeOptions.text_options):
#   t5_impl: "fused" (shared/t5_fused.py: q/k/v and the gated FF's inputs as one matmul each, one SDPA
#     call with T5's position bias) or "transformers" (the library's forward). Same function.
#   t5_fp32_wo: T5's FF down-projections (`wo`) in fp32, as transformers before 5 did for bf16 loads
#     (`_keep_in_fp32_modules`, against fp16 overflow; bf16 has fp32's range, so off by default; slower).
OPTIONS = {"t5_impl": "fused", "t5_fp32_wo": False}


# What each of the text encoders' parts of a FLUX.1 folder is, for messages (the family's `parts` take them in).
TEXT_PARTS = {
    "text_encoder": "the CLIP text encoder",
    "text_encoder_2": "the T5 text encoder",
    "tokenizer": "the CLIP tokenizer",
    "tokenizer_2": "the T5 tokenizer",
}


def _what(part: str) -> str:
    return TEXT_PARTS[part]


def load_t5(model: str, dtype=torch.float32, device="cpu"):
    """(tokenizer, encoder) for T5."""
    from transformers import AutoTokenizer, T5EncoderModel
    tok = load_part(AutoTokenizer.from_pretrained, model, "tokenizer_2", _what("tokenizer_2"), trust_remote_code=False)
    enc = load_part(T5EncoderModel.from_pretrained, model, "text_encoder_2", _what("text_encoder_2"), dtype=dtype,
                    use_safetensors=True, trust_remote_code=False)
    return tok, enc.to(device).eval()


def load_t5_tokenizer(model: str):
    """T5's tokenizer alone (no weights)."""
    from transformers import AutoTokenizer
    return load_part(AutoTokenizer.from_pretrained, model, "tokenizer_2", _what("tokenizer_2"), trust_remote_code=False)


def load_clip(model: str, dtype=torch.float32, device="cpu"):
    """(tokenizer, encoder) for CLIP-L's text tower."""
    from transformers import AutoTokenizer, CLIPTextModel
    tok = load_part(AutoTokenizer.from_pretrained, model, "tokenizer", _what("tokenizer"), trust_remote_code=False)
    enc = load_part(CLIPTextModel.from_pretrained, model, "text_encoder", _what("text_encoder"), dtype=dtype,
                    use_safetensors=True, trust_remote_code=False)
    return tok, enc.to(device).eval()


def default_max_length(tokenizer, requested: int | None) -> int:
    """T5's token count: as asked, else the tokenizer's model_max_length (at most 512, FLUX.1's)."""
    tok_max = getattr(tokenizer, "model_max_length", 512)
    return requested or (tok_max if 0 < tok_max <= 512 else 512)


def t5_lengths(model: str, captions: list[str], max_length: int | None) -> tuple[list[int], int]:
    """Each caption's real T5 tokens (end-of-sequence included, as encode counts them), and the max length."""
    tok = load_t5_tokenizer(model)
    length = default_max_length(tok, max_length)
    if not captions:
        return [], length
    mask = tok(captions, padding="longest", max_length=length, truncation=True, return_tensors="pt").attention_mask
    return mask.sum(1).tolist(), length


@torch.no_grad()
def encode_prompts(prompts: list[str], t5_tokenizer, t5, clip_tokenizer, clip, *, t5_mode: str = "padded",
                   t5_max_length: int = 512, device=None, pad_to_multiple_of: int | None = None) -> dict:
    """Encode prompts as FLUX does.

    Returns t5 [B, L, D] (L = t5_max_length when padded, the longest prompt when trimmed), t5_len [B]
    (real tokens, end-of-sequence included), t5_mask [B, L] bool, clip [B, D_clip] (pooled output).

    padded: T5 sees `t5_max_length` tokens with no attention mask (FLUX.1's convention).
    trimmed: T5 sees each prompt's real tokens only (attention mask), and only those are kept.
    `pad_to_multiple_of` (trimmed only) rounds the batch's text length up, so that a compiled T5
    meets few shapes; the masked padding leaves the real tokens' encodings unchanged.
    """
    from .base import TEXT_MODES
    if t5_mode not in TEXT_MODES:
        raise ValueError(f"unknown T5 mode {t5_mode!r}; choose one of {', '.join(TEXT_MODES)}")
    device = device if device is not None else t5.device
    padding = "max_length" if t5_mode == "padded" else "longest"
    t5_in = t5_tokenizer(prompts, padding=padding, max_length=t5_max_length, truncation=True,
                         return_tensors="pt")
    ids, mask = t5_in.input_ids, t5_in.attention_mask
    if t5_mode == "trimmed" and pad_to_multiple_of:
        ids, mask = _pad_to_bucket(ids, mask, pad_to_multiple_of, t5_max_length, t5_tokenizer.pad_token_id)
    ids, mask = to_device(ids, device), to_device(mask, device)
    if t5_mode == "padded":
        t5_out = t5(ids, output_hidden_states=False)[0]
    else:
        t5_out = t5(ids, attention_mask=mask, output_hidden_states=False)[0]
    clip_in = clip_tokenizer(prompts, padding="max_length", max_length=clip_tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
    pooled = clip_pooled(clip, clip_in.input_ids, clip_tokenizer.eos_token_id, device)
    return {"t5": t5_out, "t5_len": mask.sum(1), "t5_mask": mask.bool(), "clip": pooled}


def clip_pooled(clip, ids: torch.Tensor, eos_id: int | None, device, multiple: int = CLIP_CUT_MULTIPLE) -> torch.Tensor:
    """CLIP's pooled output for [B, 77] token ids, running only the positions up to the pooled one.

    CLIP's text transformer is causal: a position sees only those before it, so the pooled
    token's state (the end-of-text token's; older configs pool at the largest token id) does
    not depend on the padding after it. FLUX pads every prompt to 77 tokens, while captions
    are mostly 20-40: the cut skips about half of CLIP's work. The cut is at a multiple of
    `multiple` (so CLIP meets five lengths at most), past both candidate pooled positions."""
    last = ids.to(torch.int64).argmax(dim=1)             # pooled position in configs with eos_token_id 2
    if eos_id is not None:
        is_eos = ids == eos_id
        last = torch.maximum(last, torch.where(is_eos.any(1), is_eos.int().argmax(dim=1), ids.shape[1] - 1))
    keep = int(last.max()) + 1
    keep = min(ids.shape[1], round_up(keep, multiple))
    return clip(to_device(ids[:, :keep].contiguous(), device), output_hidden_states=False).pooler_output


def _pad_to_bucket(ids: torch.Tensor, mask: torch.Tensor, multiple: int, max_length: int, pad_id: int):
    """Pad [B, L] ids and mask up to L rounded to `multiple`, never past `max_length` (which need
    not be a multiple itself: the tokenizer's own pad_to_multiple_of refuses that)."""
    length = ids.shape[1]
    target = max(length, min(round_up(length, multiple), max_length))
    extra = target - length
    if extra <= 0:
        return ids, mask
    return (torch.nn.functional.pad(ids, (0, extra), value=pad_id),
            torch.nn.functional.pad(mask, (0, extra), value=0))


def set_t5_wo_dtype(t5, wo_dtype: torch.dtype, compute_dtype: torch.dtype) -> None:
    """Put all of T5 in `compute_dtype`, then its FF down-projections `wo` in `wo_dtype`
    (T5's FF casts its input to wo's dtype itself)."""
    t5.to(compute_dtype)
    if wo_dtype != compute_dtype:
        for name, module in t5.named_modules():
            if name.endswith(".wo"):
                module.to(wo_dtype)


class Flux1TextEncoder:
    """T5 and CLIP of a FLUX.1 model folder, loaded once. `encode` gives a batch's cache columns
    ({"t5", "t5_len", "clip"}); `prompt_encodings` gives prompts one PromptEncoding each, as the
    sampler takes them."""

    def __init__(self, model: str, device, dtype: torch.dtype, *, mode: str, max_length: int | None,
                 compile: bool = False, options: dict | None = None, precision: str = "bf16"):
        from ..t5_fused import FusedT5Encoder
        from ..text_float8 import check_text_precision, refuse_none, t5_to_float8
        opts = {**OPTIONS, **(options or {})}
        if opts["t5_impl"] not in ("fused", "transformers"):   # before minutes of model loading
            raise ValueError(f"unknown t5_impl {opts['t5_impl']!r}; use fused or transformers")
        check_text_precision(precision, device)
        self.device, self.dtype, self.mode = torch.device(device), dtype, mode
        self.t5_tok, self.t5 = load_t5(model, dtype, self.device)
        set_t5_wo_dtype(self.t5, torch.float32 if opts["t5_fp32_wo"] else dtype, dtype)
        self.clip_tok, self.clip = load_clip(model, dtype, self.device)
        self.t5.requires_grad_(False)
        self.clip.requires_grad_(False)
        self.t5_impl = ("fused" if opts["t5_impl"] == "fused" and not opts["t5_fp32_wo"]
                        and FusedT5Encoder.supports(self.t5) else "transformers")
        if self.t5_impl == "fused":
            self.t5 = FusedT5Encoder(self.t5, release_source=True)
        if precision == "fp8":   # T5 only: CLIP's share of the text matmuls is under 1% (shared/text_float8.py)
            refuse_none(t5_to_float8(self.t5), "T5")
        self.max_length = default_max_length(self.t5_tok, max_length)
        # Static shapes when compiled: trimmed text is padded to a multiple of TEXT_PAD_MULTIPLE,
        # so T5 compiles once per length bucket; dynamic shapes recompiled for each new length
        # (docs/BENCHMARKS.md, run B).
        from ..text_batch import TEXT_PAD_MULTIPLE
        self.pad_multiple = TEXT_PAD_MULTIPLE if compile else None
        if compile:
            if self.t5_impl == "fused":
                self.t5.attention = COMPILED_T5_ATTENTION
                self.t5.blocks = torch.compile(self.t5.blocks, dynamic=False)
            else:
                self.t5.forward = torch.compile(self.t5.forward, dynamic=False)
        self.identities = {"t5": model_identity(model, "text_encoder_2", _what("text_encoder_2")),
                           "clip": model_identity(model, "text_encoder", _what("text_encoder"))}

    def dims(self) -> dict:
        return {"t5_dim": int(self.t5.config.d_model), "clip_dim": int(self.clip.config.hidden_size)}

    def facts(self) -> dict:
        """What the cache's settings record of this encoder: `t5_wo_dtype` (compared on a rerun) and
        `t5_impl` (recorded, not compared: both implementations compute the same function)."""
        return {"t5_wo_dtype": self._wo_dtype(), "t5_impl": self.t5_impl}

    def _wo_dtype(self) -> str:
        from ..cache.schema import dtype_name
        if self.t5_impl == "fused":
            return dtype_name(self.t5.dtype)
        dtypes = {m.weight.dtype for name, m in self.t5.named_modules() if name.endswith(".wo")}
        return dtype_name(dtypes.pop() if len(dtypes) == 1 else self.dtype)

    @torch.inference_mode()
    def encode(self, captions: list[str]) -> dict:
        """{"t5": [B, L, D], "t5_len": [B], "clip": [B, Dc]} on the device."""
        out = encode_prompts(captions, self.t5_tok, self.t5, self.clip_tok, self.clip, t5_mode=self.mode,
                             t5_max_length=self.max_length, device=self.device, pad_to_multiple_of=self.pad_multiple)
        return {"t5": out["t5"], "t5_len": out["t5_len"], "clip": out["clip"]}

    @torch.no_grad()
    def prompt_encodings(self, prompts: list[str], batch_size: int = 8) -> list[PromptEncoding]:
        """Every prompt's encoding, made up front (the encoders can then leave memory): T5 only the real
        tokens when trimmed, as the cache stores them for the trainer."""
        out = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            enc = encode_prompts(chunk, self.t5_tok, self.t5, self.clip_tok, self.clip, t5_mode=self.mode,
                                 t5_max_length=self.max_length)
            for i in range(len(chunk)):
                n = int(enc["t5_len"][i]) if self.mode == "trimmed" else enc["t5"].shape[1]
                out.append(PromptEncoding(enc["t5"][i, :n].clone(), enc["clip"][i].clone()))
        return out
