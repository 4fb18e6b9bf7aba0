"""The encoders of stage 1: the VAE posterior and the model family's text encoder over a batch, on one device.

The hot path keeps the device busy: uint8 pixels travel (pinned, non-blocking) and become
[-1, 1] floats on the device; outputs are cast to the storage dtype on the device and copied
back without blocking; token ids travel pinned too (a blocking host-to-device copy would wait
for every queued kernel). A batch's copy is waited for by the writer thread (row_writer.py),
so the main thread keeps queueing batches while Parquet is written.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from shared.cache.references import latent_column
from shared.cache.schema import torch_dtype
from shared.family import family_of_model
from shared.models import model_identity
from shared.family import load_vae
from shared.precision import canonical_dtype

from .images import to_model_range


@dataclass
class EncodeOptions:
    text_mode: str = "padded"
    text_max_length: int | None = None    # None: the family's default (FLUX.1: T5's model_max_length, 512)
    store_logvar: bool = False
    dtype: str = "bfloat16"               # storage dtype of every tensor column
    compute_dtype: str | None = None      # None: `dtype` on CUDA, float32 on CPU (CPU bf16 is slow)
    compile: bool = False                 # torch.compile the text and VAE encoders
    text_precision: str = "bf16"          # fp8: the text encoder's large matmuls in float8 (shared/text_float8.py)
    # The family's own text-encoder options (FLUX.1: t5_impl, t5_fp32_wo; shared/family/flux1_text.py)
    text_options: dict = field(default_factory=dict)


def check_model(model: str):
    """Refuse a model folder (or hub id) without the encoders' parts now, in a moment: before the
    decoding workers start and before any output exists (loading finds it only after their start-up).
    Returns the model's family."""
    family = family_of_model(model)
    for part in ("vae",) + family.text_parts:
        model_identity(model, part, family.parts[part])   # raises ModelLoadError naming a missing folder or part
    return family


class Encoders:
    """The VAE and the family's text encoder of a model, loaded once, ready to encode batches."""

    def __init__(self, model: str, device: str, opts: EncodeOptions):
        self.family = family_of_model(model)
        self.text_spec = self.family.text
        if opts.text_mode not in self.text_spec.modes:
            raise ValueError(f"{model}: {self.family.name} text takes mode {' or '.join(self.text_spec.modes)}, "
                             f"not {opts.text_mode!r}")
        self.device = torch.device(device)
        self.opts = opts
        compute = opts.compute_dtype or (opts.dtype if self.device.type == "cuda" else "float32")
        self.compute_dtype_name = canonical_dtype(compute)
        self.compute_dtype = torch_dtype(self.compute_dtype_name)
        self.store_dtype = torch_dtype(canonical_dtype(opts.dtype))
        self.vae = load_vae(model, self.compute_dtype, self.device, self.family)
        self.text = self.family.load_text_encoder(model, self.device, self.compute_dtype, mode=opts.text_mode,
                                                  max_length=opts.text_max_length, compile=opts.compile,
                                                  options=opts.text_options, precision=opts.text_precision)
        self.vae.requires_grad_(False)
        if self.device.type == "cuda":
            # TF32 for whatever still runs in fp32 (T5's `wo` with t5_fp32_wo, an fp32 compute dtype).
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            # The VAE meets one input shape (or one per aspect bucket): let cuDNN pick its fastest convs.
            torch.backends.cudnn.benchmark = True
        self.vae_encoder = self.vae.encoder
        self.pad_batches = opts.compile   # short batches run at full size (see encode_batch)
        if opts.compile:
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            self.vae_encoder = torch.compile(self.vae.encoder, dynamic=False)
        self.identities = {"vae": model_identity(model, "vae", self.family.parts["vae"]), **self.text.identities}

    # -- facts for the manifest -------------------------------------------------------------
    def dims(self) -> dict:
        return {"latent_channels": int(self.vae.config.latent_channels), **self.text.dims()}

    def vae_factors(self) -> dict:
        return self.family.vae_facts(self.vae)

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
    def encode_batch(self, pixels_u8: torch.Tensor, captions: list[str], pad_to: int | None = None,
                     refs: list[torch.Tensor] = ()) -> "HostBatch":
        """Queue a batch's work; returns host tensors whose copy completes by `HostBatch.wait()`.

        `pad_to`: run a short batch (an input shard's last images) at this size, so that a compiled
        encoder meets one batch shape instead of compiling again for each remainder; the padding
        rows are dropped before the copy back. `refs`: each reference image's uint8 pixels [B, 3, h, w],
        encoded as the target (the same VAE call, dtype, posterior mean) into `ref{i}_latent`."""
        n = len(captions)
        if self.pad_batches and pad_to and n < pad_to:
            pixels_u8 = _pad(pixels_u8, pad_to)
            refs = [_pad(r, pad_to) for r in refs]
            captions = list(captions) + [""] * (pad_to - n)
        mean, logvar = self.encode_pixels(pixels_u8)
        ref_means = [self.encode_pixels(r)[0] for r in refs]
        text = self.text.encode(captions)
        st, spec = self.store_dtype, self.text_spec
        out = {"latent": mean[:n].to(st).contiguous(), **{c: text[c][:n].to(st) for c in spec.tensor_columns},
               spec.length: text[spec.length][:n].to(torch.int32)}
        if self.opts.store_logvar:
            out["latent_logvar"] = logvar[:n].to(st).contiguous()
        for i, ref in enumerate(ref_means):
            out[latent_column(i)] = ref[:n].to(st).contiguous()
        return HostBatch.copy_from(out)

    @torch.inference_mode()
    def encode_alt(self, alt_captions: list[list[str]], batch_size: int) -> list["HostBatch"]:
        """The rows' other captions (captions.py), all of them in order, in batches of `batch_size` (padded
        to it when compiled, as encode_batch pads): one HostBatch of text columns per batch, none where no
        row has one. Each caption's encodings are those of a single-caption encode: padded text meets the
        same shapes, trimmed text its own mask."""
        flat = [c for row in alt_captions for c in row]
        spec, st, out = self.text_spec, self.store_dtype, []
        for start in range(0, len(flat), batch_size):
            chunk = flat[start:start + batch_size]
            n = len(chunk)
            if self.pad_batches and n < batch_size:
                chunk = chunk + [""] * (batch_size - n)
            text = self.text.encode(chunk)
            out.append(HostBatch.copy_from({**{c: text[c][:n].to(st) for c in spec.tensor_columns},
                                            spec.length: text[spec.length][:n].to(torch.int32)}))
        return out

    @torch.inference_mode()
    def empty_prompt(self) -> dict:
        """The empty prompt's encodings, as stored: the text states [L, D] (L = its length when trimmed),
        the pooled vector where the family has one, and the length."""
        spec = self.text_spec
        text = self.text.encode([""])
        length = int(text[spec.length][0])
        states = text[spec.states][0] if self.opts.text_mode == "padded" else text[spec.states][0, :length]
        out = {spec.states: states.to("cpu", self.store_dtype).contiguous()}
        if spec.pooled:
            out[spec.pooled] = text[spec.pooled][0].to("cpu", self.store_dtype).contiguous()
        out[spec.length] = torch.tensor(length, dtype=torch.int64)
        return out


def _pad(pixels_u8: torch.Tensor, size: int) -> torch.Tensor:
    """A short batch run at `size` rows, the first image repeated (dropped after encoding)."""
    return torch.cat([pixels_u8, pixels_u8[:1].expand(size - len(pixels_u8), -1, -1, -1)])


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
