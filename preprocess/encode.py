"""The encoders of stage 1: VAE posterior, T5 and CLIP over a batch, on one device.

The hot path keeps the device busy: uint8 pixels travel (pinned, non-blocking) and become
[-1, 1] floats on the device; outputs are cast to the storage dtype on the device and copied
back without blocking; token ids travel pinned too (a blocking host-to-device copy would wait
for every queued kernel). A batch's copy is waited for by the writer thread (row_writer.py),
so the main thread keeps queueing batches while Parquet is written.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from shared.cache.schema import dtype_name, torch_dtype
from shared.models import load_clip, load_t5, load_vae, model_identity
from shared.precision import canonical_dtype
from shared.t5_fused import FusedT5Encoder
from shared.text import T5_PAD_MULTIPLE, encode_prompts

from .images import to_model_range

# Attention of the compiled fused T5 (shared/t5_fused.py ATTENTION): auto runs flex attention at
# long text (padded-256 and -512) and the memory-efficient kernel at short trimmed text, the faster
# of the two at each (bench/encode.py --t5-attention; docs/BENCHMARKS.md, run E).
COMPILED_T5_ATTENTION = "auto"


@dataclass
class EncodeOptions:
    t5_mode: str = "padded"
    t5_max_length: int | None = None     # None: the T5 tokenizer's model_max_length (512 for FLUX.1)
    store_logvar: bool = False
    dtype: str = "bfloat16"               # storage dtype of every tensor column
    compute_dtype: str | None = None      # None: `dtype` on CUDA, float32 on CPU (CPU bf16 is slow)
    compile: bool = False                 # torch.compile the T5 and VAE encoders
    # T5's FF down-projections (`wo`) are in transformers' `_keep_in_fp32_modules` (against fp16
    # overflow). transformers 5 applies it to fp16 loads only, older versions to bf16 loads too,
    # where a third of T5's FF matmuls then ran in fp32. bf16 has fp32's range, so by default the
    # whole T5 runs in the compute dtype, whatever the version; True runs `wo` in fp32 (as older
    # transformers did under diffusers' FluxPipeline; slower).
    t5_fp32_wo: bool = False
    # "fused": shared/t5_fused.py (q/k/v and the gated FF's inputs as one matmul each, one SDPA call
    # with T5's position bias); "transformers": the library's T5EncoderModel forward. Same function;
    # t5_fp32_wo needs "transformers".
    t5_impl: str = "fused"


# The model parts the encoders load (shared/models.py names them).
ENCODER_PARTS = ("vae", "text_encoder_2", "tokenizer_2", "text_encoder", "tokenizer")


def check_model(model: str) -> None:
    """Refuse a model folder (or hub id) without the encoders' parts now, in a moment: before the
    decoding workers start and before any output exists (loading finds it only after their start-up)."""
    for part in ENCODER_PARTS:
        model_identity(model, part)   # raises ModelLoadError naming a missing folder or part


def t5_max_length(tokenizer, requested: int | None) -> int:
    """T5's token count: as asked, else the tokenizer's model_max_length (at most 512, FLUX.1's)."""
    tok_max = getattr(tokenizer, "model_max_length", 512)
    return requested or (tok_max if 0 < tok_max <= 512 else 512)


def set_t5_wo_dtype(t5, wo_dtype: torch.dtype, compute_dtype: torch.dtype) -> None:
    """Put all of T5 in `compute_dtype`, then its FF down-projections `wo` in `wo_dtype`
    (T5's FF casts its input to wo's dtype itself)."""
    t5.to(compute_dtype)
    if wo_dtype != compute_dtype:
        for name, module in t5.named_modules():
            if name.endswith(".wo"):
                module.to(wo_dtype)


class Encoders:
    """VAE, T5 and CLIP of a FLUX model, loaded once, ready to encode batches."""

    def __init__(self, model: str, device: str, opts: EncodeOptions):
        if opts.t5_impl not in ("fused", "transformers"):   # before minutes of model loading
            raise ValueError(f"unknown t5_impl {opts.t5_impl!r}; use fused or transformers")
        self.device = torch.device(device)
        self.opts = opts
        compute = opts.compute_dtype or (opts.dtype if self.device.type == "cuda" else "float32")
        self.compute_dtype_name = canonical_dtype(compute)
        self.compute_dtype = torch_dtype(self.compute_dtype_name)
        self.store_dtype = torch_dtype(canonical_dtype(opts.dtype))
        self.vae = load_vae(model, self.compute_dtype, self.device)
        self.t5_tok, self.t5 = load_t5(model, self.compute_dtype, self.device)
        set_t5_wo_dtype(self.t5, torch.float32 if opts.t5_fp32_wo else self.compute_dtype, self.compute_dtype)
        self.clip_tok, self.clip = load_clip(model, self.compute_dtype, self.device)
        for m in (self.vae, self.t5, self.clip):
            m.requires_grad_(False)
        self.t5_impl = ("fused" if opts.t5_impl == "fused" and not opts.t5_fp32_wo and FusedT5Encoder.supports(self.t5)
                        else "transformers")
        if self.t5_impl == "fused":
            self.t5 = FusedT5Encoder(self.t5, release_source=True)
        self.t5_max_length = t5_max_length(self.t5_tok, opts.t5_max_length)
        if self.device.type == "cuda":
            # TF32 for whatever still runs in fp32 (T5's `wo` with t5_fp32_wo, an fp32 compute dtype).
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            # The VAE meets one input shape (or one per aspect bucket): let cuDNN pick its fastest convs.
            torch.backends.cudnn.benchmark = True
        self.vae_encoder = self.vae.encoder
        # Static shapes when compiled: trimmed text is padded to a multiple of T5_PAD_MULTIPLE,
        # so T5 compiles once per length bucket; dynamic shapes recompiled for each new length
        # (docs/BENCHMARKS.md, run B).
        self.t5_pad_multiple = T5_PAD_MULTIPLE if opts.compile else None
        self.pad_batches = opts.compile   # short batches run at full size (see encode_batch)
        if opts.compile:
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            self.vae_encoder = torch.compile(self.vae.encoder, dynamic=False)
            if self.t5_impl == "fused":
                self.t5.attention = COMPILED_T5_ATTENTION
                self.t5.blocks = torch.compile(self.t5.blocks, dynamic=False)
            else:
                self.t5.forward = torch.compile(self.t5.forward, dynamic=False)
        self.identities = {"vae": model_identity(model, "vae"), "t5": model_identity(model, "text_encoder_2"),
                           "clip": model_identity(model, "text_encoder")}

    # -- facts for the manifest -------------------------------------------------------------
    def t5_wo_dtype(self) -> str:
        """The dtype T5's FF down-projections run in (see EncodeOptions.t5_fp32_wo)."""
        if self.t5_impl == "fused":
            return dtype_name(self.t5.dtype)
        dtypes = {m.weight.dtype for name, m in self.t5.named_modules() if name.endswith(".wo")}
        return dtype_name(dtypes.pop()) if len(dtypes) == 1 else self.compute_dtype_name

    def dims(self) -> dict:
        return {"latent_channels": int(self.vae.config.latent_channels),
                "t5_dim": int(self.t5.config.d_model), "clip_dim": int(self.clip.config.hidden_size)}

    def vae_factors(self) -> dict:
        cfg = self.vae.config
        return {"scaling_factor": float(cfg.scaling_factor), "shift_factor": float(cfg.shift_factor or 0.0)}

    # -- encoding ----------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_pixels(self, pixels_u8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 [B, 3, H, W] -> posterior (mean, logvar), each [B, C, H/8, W/8], on the device."""
        x = to_model_range(pixels_u8.to(self.device, non_blocking=True), self.compute_dtype)
        moments = self.vae_encoder(x)
        if getattr(self.vae, "quant_conv", None) is not None:
            moments = self.vae.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)   # diffusers' DiagonalGaussianDistribution clamp

    @torch.inference_mode()
    def encode_text(self, captions: list[str]) -> dict:
        return encode_prompts(captions, self.t5_tok, self.t5, self.clip_tok, self.clip, t5_mode=self.opts.t5_mode,
                              t5_max_length=self.t5_max_length, device=self.device,
                              pad_to_multiple_of=self.t5_pad_multiple)

    @torch.inference_mode()
    def encode_batch(self, pixels_u8: torch.Tensor, captions: list[str], pad_to: int | None = None) -> "HostBatch":
        """Queue a batch's work; returns host tensors whose copy completes by `HostBatch.wait()`.

        `pad_to`: run a short batch (an input shard's last images) at this size, so that a compiled
        encoder meets one batch shape instead of compiling again for each remainder; the padding
        rows are dropped before the copy back."""
        n = len(captions)
        if self.pad_batches and pad_to and n < pad_to:
            pixels_u8 = torch.cat([pixels_u8, pixels_u8[:1].expand(pad_to - n, -1, -1, -1)])
            captions = list(captions) + [""] * (pad_to - n)
        mean, logvar = self.encode_pixels(pixels_u8)
        text = self.encode_text(captions)
        st = self.store_dtype
        out = {"latent": mean[:n].to(st).contiguous(), "t5": text["t5"][:n].to(st), "clip": text["clip"][:n].to(st),
               "t5_len": text["t5_len"][:n].to(torch.int32)}
        if self.opts.store_logvar:
            out["latent_logvar"] = logvar[:n].to(st).contiguous()
        return HostBatch.copy_from(out)

    @torch.inference_mode()
    def empty_prompt(self) -> dict:
        """The empty prompt's encodings, as stored: t5 [L, D] (L = t5_len when trimmed), clip [D], t5_len."""
        text = self.encode_text([""])
        length = int(text["t5_len"][0])
        t5 = text["t5"][0] if self.opts.t5_mode == "padded" else text["t5"][0, :length]
        return {"t5": t5.to("cpu", self.store_dtype).contiguous(),
                "clip": text["clip"][0].to("cpu", self.store_dtype).contiguous(),
                "t5_len": torch.tensor(length, dtype=torch.int64)}


class HostBatch:
    """Device outputs being copied to host memory; `wait()` returns them once there."""

    def __init__(self, tensors: dict, event):
        self.tensors, self.event = tensors, event

    @classmethod
    def copy_from(cls, device_tensors: dict) -> "HostBatch":
        first = next(iter(device_tensors.values()))
        if first.device.type != "cuda":
            return cls({k: v.contiguous() for k, v in device_tensors.items()}, None)
        # The copy runs on a stream of its own, so the next batch's kernels run while this batch's
        # outputs (128 MB at padded-256, batch 64) cross to the host. non_blocking device-to-host
        # copies land in pinned memory and return at once.
        compute = torch.cuda.current_stream(first.device)
        copy = _copy_stream(first.device)
        copy.wait_stream(compute)
        with torch.cuda.stream(copy):
            host = {k: v.to("cpu", non_blocking=True) for k, v in device_tensors.items()}
            event = torch.cuda.Event()
            event.record(copy)
        for v in device_tensors.values():
            v.record_stream(copy)   # the allocator must not reuse them before the copy has read them
        return cls(host, event)

    def wait(self) -> dict:
        if self.event is not None:
            self.event.synchronize()
            self.event = None
        return self.tensors


_COPY_STREAMS: dict = {}


def _copy_stream(device: torch.device) -> "torch.cuda.Stream":
    if device not in _COPY_STREAMS:
        _COPY_STREAMS[device] = torch.cuda.Stream(device)
    return _COPY_STREAMS[device]
