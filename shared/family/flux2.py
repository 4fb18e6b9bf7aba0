"""FLUX.2 ([klein] 4B / 9B, [dev] 32B): one text encoder (Qwen3 or Mistral 3, read from the folder), 512
padded text tokens and no pooled vector; the 32-channel VAE patchified 2x2 and normalised by its BatchNorm's
running statistics; 4-axis position ids (t, h, w, l). The variants share the transformer class, the VAE and
all of this; [dev] has a guidance embedding and [klein] base takes true CFG, which callers read from the
transformer config (guidance_embeds) and model_index.json (is_distilled). Formulas: diffusers'
pipelines/flux2 (pipeline_flux2.py, pipeline_flux2_klein.py); text encoder: flux2_text.py."""
from __future__ import annotations

from functools import lru_cache

import torch

from .base import Family, TextSpec, joint_mask

# Reference images (FLUX.2 edit) sit at t = REF_T0 + REF_T0 * i (diffusers _prepare_image_ids,
# BFL's encode_image_refs); the noisy image at t = 0.
REF_T0 = 10


class Flux2(Family):
    name = "flux2"
    pipelines = ("Flux2KleinPipeline", "Flux2Pipeline")
    transformer_class = "Flux2Transformer2DModel"
    vae_class = "AutoencoderKLFlux2"
    lora_pipeline = "Flux2KleinPipeline"   # Flux2LoraLoaderMixin: [dev]'s Flux2Pipeline reads the same layout
    bfl_modules = ("shared.bfl_flux2", "shared.bfl_flux2_lora")
    # musubi-tuner's FLUX.2 LoRA module; [dev] has the guidance embedding, [klein] not
    modelspec_names = {"architecture": {True: "flux-2-dev", False: "flux-2-klein"},
                       "network_module": "networks.lora_flux_2", "base_model_version": "flux2"}
    text = TextSpec(states="text", length="text_len", pooled=None, modes=("padded",), label="Qwen3/Mistral 3")
    parts = {
        "vae": "the VAE (AutoencoderKLFlux2)",
        "transformer": "the FLUX.2 transformer",
        "text_encoder": "the text encoder (Qwen3 or Mistral 3)",
        "tokenizer": "the text encoder's tokenizer",
        "scheduler": "the noise schedule",
    }
    text_parts = ("text_encoder", "tokenizer")
    vae_fact_keys = ("bn_mean", "bn_var", "batch_norm_eps")
    manifest_facts = ()
    settings_only = ()
    # The attention and MLP projections of both block kinds (regex, peft's full match): those BFL-format
    # FLUX.2 LoRAs carry (diffusers' _convert_non_diffusers_flux2_lora_to_diffusers: img/txt qkv and proj,
    # img/txt MLP in and out; single blocks' linear1 = to_qkv_mlp_proj, linear2 = to_out). The double
    # blocks' `attn.to_out` is a ModuleList (peft refuses it), hence `to_out\.0` there.
    default_lora_targets = (
        r"(?:.*\.)?transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj"
        r"|to_add_out)|ff\.(linear_in|linear_out)|ff_context\.(linear_in|linear_out))"
        r"|(?:.*\.)?single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out)"
    )
    # Layers fed the time/guidance embedding (one row per image): shared across blocks in FLUX.2.
    PER_SAMPLE = ("time_guidance_embed.", "double_stream_modulation_img.", "double_stream_modulation_txt.",
                  "single_stream_modulation.", "norm_out.")

    # [dev]: 0.78B parameters (1.4 GiB in bf16; the context embedder takes 15360-wide text), [klein] 9B 0.35B
    quantize_outside = ("context_embedder", "time_guidance_embed", "double_stream_modulation_img",
                        "double_stream_modulation_txt", "single_stream_modulation", "norm_out")

    def per_sample_layer(self, name: str) -> bool:
        return name.startswith(self.PER_SAMPLE)

    # -- latents ---------------------------------------------------------------------------------
    def vae_facts(self, vae) -> dict:
        """The BatchNorm's running mean and variance (float32 values, as the VAE holds them: load its
        BatchNorm in float32 for the checkpoint's exact values) and its eps."""
        bn = vae.bn
        return {"bn_mean": bn.running_mean.float().cpu().tolist(), "bn_var": bn.running_var.float().cpu().tolist(),
                "batch_norm_eps": float(vae.config.batch_norm_eps)}

    def to_x0(self, latent: torch.Tensor, facts: dict) -> torch.Tensor:
        """Posterior mean [B, C, h, w] -> 2x2 patches [B, 4C, h/2, w/2] -> (x - mean) / sqrt(var + eps)."""
        mean, std = _bn_stats(facts, latent.device)
        return (patchify(latent.float()) - mean) / std

    def from_x0(self, x0: torch.Tensor, facts: dict) -> torch.Tensor:
        mean, std = _bn_stats(facts, x0.device)
        return unpatchify(x0.float() * std + mean)

    def x0_shape(self, channels: int, h: int, w: int) -> tuple[int, int, int]:
        return 4 * channels, h // 2, w // 2

    def mask_tokens(self, mask: torch.Tensor, channels: int) -> torch.Tensor:
        """Through the same 2x2 patchify as the latent: each of a token's 4C values keeps its own cell's mask."""
        return self.pack(patchify(mask[:, None].expand(-1, channels, -1, -1).contiguous()))

    def pack(self, x0: torch.Tensor) -> torch.Tensor:
        """[B, D, H, W] -> [B, H*W, D], row-major (the pipelines' _pack_latents)."""
        b, d, h, w = x0.shape
        return x0.reshape(b, d, h * w).permute(0, 2, 1)

    def unpack(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """[B, (h/2)(w/2), D] of an h x w latent -> [B, D, h/2, w/2]."""
        b, n, d = tokens.shape
        if n != self.image_tokens(h, w):
            raise ValueError(f"{n} image tokens do not make a {h}x{w} latent ({self.image_tokens(h, w)} tokens)")
        return tokens.permute(0, 2, 1).reshape(b, d, h // 2, w // 2)

    def image_ids(self, h: int, w: int, t: int = 0, device=None) -> torch.Tensor:
        """Position ids (t, row, col, 0) of an h x w latent's tokens: [(h/2)(w/2), 4] float32. t = 0 for the
        noisy image; reference image i sits at t = REF_T0 * (1 + i)."""
        ids = torch.zeros(h // 2, w // 2, 4, dtype=torch.float32, device=device)   # made on the device: no copy
        ids[..., 0] = t
        ids[..., 1] = torch.arange(h // 2, dtype=torch.float32, device=device)[:, None]
        ids[..., 2] = torch.arange(w // 2, dtype=torch.float32, device=device)[None, :]
        return ids.reshape(-1, 4)

    def text_ids(self, length: int, device=None) -> torch.Tensor:
        """Text token i sits at (0, 0, 0, i): [length, 4] float32."""
        ids = torch.zeros(length, 4, dtype=torch.float32, device=device)
        ids[:, 3] = torch.arange(length, dtype=torch.float32, device=device)
        return ids

    # -- reference images ----------------------------------------------------------------------------
    def reference_area(self, count: int) -> int:
        """BFL's FLUX.2 rule (flux2 sampling's limit_pixels): one reference up to about 2024^2 pixels, several
        up to 1024^2 each. diffusers 0.42.1's pipelines cap every reference at 1024^2; below both caps (and
        with several references) the two agree."""
        return 2024 * 2024 if count == 1 else 1024 * 1024

    def reference_size(self, width, height, count, override=None):
        """As the base rule, for the images the FLUX.2 pipelines take (Flux2ImageProcessor.check_image_input:
        sides of 64 pixels or more, aspect within 8:1); (0, 0) for others, which encode skips."""
        if min(width, height) < 64 or max(width, height) > 8 * min(width, height):
            return 0, 0
        return super().reference_size(width, height, count, override)

    # -- the transformer call ----------------------------------------------------------------------
    def predict(self, model, tokens, timestep, text, h, w, guidance=None, flex_mask=False, refs=(), ref_keep=None):
        """As Flux2KleinPipeline / Flux2Pipeline call the transformer (timestep in [0, 1]; it scales by 1000
        itself), reference tokens after the noisy ones as their `image_latents`. `flex_mask` has nothing to
        act on: FLUX.2 text carries no mask."""
        if text.mask is not None:
            raise ValueError("FLUX.2's transformer attends every text position; a text mask (trimmed text) "
                             "would change what it sees, so give padded text with no mask")
        device, (batch, n) = tokens.device, tokens.shape[:2]
        ids = [self.image_ids(h, w, device=device)]
        for i, (ref, rh, rw) in enumerate(refs):
            tokens = torch.cat([tokens, ref.to(tokens.dtype)], dim=1)
            ids.append(self.reference_ids(rh, rw, i, device=device))
        mask = joint_mask(None, text.states.shape[1], n, tokens.shape[1] - n, ref_keep)
        out = model(
            hidden_states=tokens,
            encoder_hidden_states=text.states,
            timestep=timestep,
            img_ids=ids[0] if len(ids) == 1 else torch.cat(ids),
            txt_ids=self.text_ids(text.states.shape[1], device=device),
            guidance=None if guidance is None else torch.full((batch,), float(guidance), device=device),
            joint_attention_kwargs=None if mask is None else {"attention_mask": mask},
            return_dict=False,
        )[0]
        return out[:, :n] if refs else out

    def reference_ids(self, h, w, index, device=None):
        """Reference `index` at t = REF_T0 + REF_T0 * index (Flux2KleinPipeline._prepare_image_ids)."""
        return self.image_ids(h, w, t=REF_T0 + REF_T0 * index, device=device)

    # -- sampling ----------------------------------------------------------------------------------
    # Flux2Pipeline's guidance_scale for [dev]'s embedding; BFL's defaults (shared/presets_flux2.py): 50 steps
    # and CFG 4 for [klein] base, 4 steps without CFG for the step-distilled [klein] (is_distilled).
    default_guidance = 4.0

    def default_steps(self, shift: bool, model_index: dict | None) -> int:
        return 4 if (model_index or {}).get("is_distilled") else 50

    def default_cfg(self, model_index: dict | None, guidance_embeds: bool) -> float:
        return 1.0 if guidance_embeds or (model_index or {}).get("is_distilled") else 4.0

    def sampling_sigmas(self, steps: int, image_tokens: int, shift: bool) -> torch.Tensor:
        """The FLUX.2 pipelines' schedule: linspace(1, 1/steps, steps) through the scheduler's exponential time
        shift with mu = compute_empirical_mu(image tokens, steps), then 0. The scheduler itself computes it
        (every FLUX.2 folder's scheduler config shifts dynamically, exponentially, with no terminal stretch).
        Every FLUX.2 pipeline shifts: `shift` False is refused rather than silently meaning something no
        FLUX.2 model was made for."""
        import numpy as np
        from diffusers import FlowMatchEulerDiscreteScheduler
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu
        if not shift:
            raise ValueError("FLUX.2's pipelines always shift the sampling schedule (compute_empirical_mu); an "
                             "unshifted schedule (shift_schedule false) is not a FLUX.2 convention")
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential")
        mu = compute_empirical_mu(image_tokens, steps)
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps), mu=mu)
        return scheduler.sigmas.to(device="cpu", dtype=torch.float32)

    # -- text ----------------------------------------------------------------------------------------
    def text_dims(self, model: str) -> dict:
        from .flux2_text import text_dims
        return text_dims(model)

    def text_lengths(self, model: str, captions: list[str], max_length: int | None) -> tuple[list[int], int]:
        from .flux2_text import text_lengths
        return text_lengths(model, captions, max_length)

    def load_text_encoder(self, model, device, dtype, *, mode, max_length, compile=False, options=None,
                          precision="bf16"):
        from .flux2_text import Flux2TextEncoder
        return Flux2TextEncoder(model, device, dtype, mode=mode, max_length=max_length, compile=compile,
                                options=options, precision=precision)


def patchify(latent: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, 4C, h/2, w/2], channel c*4 + 2*dy + dx (the pipelines' _patchify_latents)."""
    b, c, h, w = latent.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent height and width must be even to make 2x2 patches, got {h}x{w}")
    x = latent.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * 4, h // 2, w // 2)


def unpatchify(x: torch.Tensor) -> torch.Tensor:
    """The inverse of patchify (the pipelines' _unpatchify_latents)."""
    b, d, h, w = x.shape
    x = x.reshape(b, d // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, d // 4, h * 2, w * 2)


def _bn_stats(facts: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, sqrt(var + eps)) as [1, D, 1, 1] float32 on `device`, made once per facts and device (a fresh
    host-to-device copy each batch would wait for the device's queued work)."""
    return _bn_stats_cached(tuple(facts["bn_mean"]), tuple(facts["bn_var"]), float(facts["batch_norm_eps"]),
                            str(torch.device(device)))


@lru_cache(maxsize=8)
def _bn_stats_cached(mean: tuple, var: tuple, eps: float, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1).to(device)
    std_t = torch.sqrt(torch.tensor(var, dtype=torch.float32).view(1, -1, 1, 1) + eps).to(device)
    return mean_t, std_t


FLUX2 = Flux2()
