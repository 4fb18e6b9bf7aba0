"""FLUX.1 ([dev], [schnell] and models of their shape): T5-XXL + pooled CLIP-L, the 16-channel VAE with
shift and scale, 2x2 patches of 64 channels, 3-axis position ids. Formulas: shared/latents.py,
shared/schedules.py; text encoders: flux1_text.py."""
from __future__ import annotations

import torch

from .. import latents, schedules
from .base import REFERENCE_MULTIPLE, Family, TextSpec, joint_mask
from .flux1_text import TEXT_PARTS


class Flux1(Family):
    name = "flux1"
    pipelines = ("FluxPipeline",)
    transformer_class = "FluxTransformer2DModel"
    vae_class = "AutoencoderKL"
    lora_pipeline = "FluxPipeline"
    bfl_modules = ("shared.bfl", "shared.bfl_lora")
    modelspec_names = {"architecture": {True: "flux-1-dev", False: "flux-1-schnell"},
                       "network_module": "networks.lora_flux", "base_model_version": "flux1"}
    text = TextSpec(states="t5", length="t5_len", pooled="clip", modes=("padded", "trimmed"), label="T5",
                    pooled_label="CLIP")
    parts = {"vae": "the VAE (AutoencoderKL)", "transformer": "the Flux transformer", **TEXT_PARTS,
             "scheduler": "the noise schedule"}
    text_parts = ("text_encoder_2", "tokenizer_2", "text_encoder", "tokenizer")
    vae_fact_keys = ("shift_factor", "scaling_factor")
    # The encoder's facts in the manifest (compared on a rerun), and those only recorded (flux1_text.py).
    manifest_facts = ("t5_wo_dtype",)
    settings_only = ("t5_impl",)
    # flux-sample (and the cache's sample prompts) encode with the library's T5, not the fused one
    sampling_text_options = {"t5_impl": "transformers"}
    # The attention and MLP projections of both block kinds (regex, peft's full match).
    default_lora_targets = (
        r".*blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
        r"|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2)|proj_mlp|proj_out)"
    )

    def per_sample_layer(self, name: str) -> bool:
        """The modulation layers of the norms and the timestep/guidance/CLIP embedding."""
        return "norm" in name or name.startswith("time_text_embed")

    # -- latents ---------------------------------------------------------------------------------
    def vae_facts(self, vae) -> dict:
        cfg = vae.config
        return {"scaling_factor": float(cfg.scaling_factor), "shift_factor": float(cfg.shift_factor or 0.0)}

    def to_x0(self, latent: torch.Tensor, facts: dict) -> torch.Tensor:
        return latents.scale_latents(latent.float(), facts["shift_factor"], facts["scaling_factor"])

    def from_x0(self, x0: torch.Tensor, facts: dict) -> torch.Tensor:
        return latents.unscale_latents(x0, facts["shift_factor"], facts["scaling_factor"])

    def x0_shape(self, channels: int, h: int, w: int) -> tuple[int, int, int]:
        return channels, h, w

    def pack(self, x0: torch.Tensor) -> torch.Tensor:
        return latents.pack_latents(x0)

    def unpack(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return latents.unpack_latents(tokens, h, w)

    # -- reference images: FLUX.1 Kontext ------------------------------------------------------------
    def reference_area(self, count: int) -> int:
        return 1024 * 1024      # the area of Kontext's preferred resolutions (used with an override only)

    def reference_resize(self, width, height, count, override=None):
        """FluxKontextPipeline's _auto_resize: the preferred Kontext resolution nearest the image's aspect (ties:
        the smaller), to which the image is resized whole (the aspect moves a little; nothing is cropped). The
        pipeline takes the aspect of the sides floored to multiples of 16 (get_default_height_width).
        `override` (--reference-resolution): the area cap of every family instead."""
        if override:
            return super().reference_resize(width, height, count, override)
        from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS
        w16, h16 = (x - x % REFERENCE_MULTIPLE for x in (width, height))
        if not w16 or not h16:
            return 0, 0          # under 16 pixels a side: no reference size (the caller skips it)
        aspect = w16 / h16
        _, w, h = min((abs(aspect - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
        return w, h

    # -- the transformer call ----------------------------------------------------------------------
    max_references = 1   # Kontext places one reference, all at axis 0 = 1 (BFL's prepare_kontext)

    def predict(self, model, tokens, timestep, text, h, w, guidance=None, flex_mask=False, refs=(), ref_keep=None):
        device, n = tokens.device, tokens.shape[1]
        self.check_references(len(refs), "predict")
        ids = [latents.image_ids(h, w, device=device)]
        for i, (ref, rh, rw) in enumerate(refs):
            tokens = torch.cat([tokens, ref.to(tokens.dtype)], dim=1)
            ids.append(self.reference_ids(rh, rw, i, device=device))
        mask = joint_mask(text.mask, text.states.shape[1], n, tokens.shape[1] - n, ref_keep)
        if mask is not None and flex_mask:
            mask = latents.flex_block_mask(mask)
        out = model(
            hidden_states=tokens,
            encoder_hidden_states=text.states,
            pooled_projections=text.pooled,
            timestep=timestep,
            img_ids=ids[0] if len(ids) == 1 else torch.cat(ids),
            txt_ids=latents.text_ids(text.states.shape[1], device=device),
            guidance=None if guidance is None else torch.full((tokens.shape[0],), float(guidance), device=device),
            joint_attention_kwargs=None if mask is None else {"attention_mask": mask},
            return_dict=False,
        )[0]
        return out[:, :n] if refs else out

    def reference_ids(self, h, w, index, device=None):
        """The reference's own grid with axis 0 = 1 (FluxKontextPipeline.prepare_latents)."""
        ids = latents.image_ids(h, w, device=device)
        ids[:, 0] = 1
        return ids

    # -- sampling ----------------------------------------------------------------------------------
    default_guidance = 3.5   # FluxPipeline's guidance_scale

    def default_shift(self, scheduler_config: dict | None) -> bool:
        """Dynamic shifting on unless the scheduler config says no ([dev] shifts, [schnell] does not)."""
        return bool((scheduler_config or {}).get("use_dynamic_shifting", True))

    def default_steps(self, shift: bool, model_index: dict | None) -> int:
        """FLUX.1-dev's 28 for a shifted schedule, schnell's 4 for an unshifted one."""
        return 28 if shift else 4

    def sampling_sigmas(self, steps: int, image_tokens: int, shift: bool) -> torch.Tensor:
        return schedules.sampling_sigmas(steps, image_tokens, shift=shift)

    # -- checks ------------------------------------------------------------------------------------
    def _more_misfits(self, get, dims: dict) -> dict:
        return {"clip_dim": (get("pooled_projection_dim"), dims["clip_dim"])}

    def text_dims(self, model: str) -> dict:
        from ..models import part_config
        return {"t5_dim": int(part_config(model, "text_encoder_2")["d_model"]),
                "clip_dim": int(part_config(model, "text_encoder")["hidden_size"])}

    def text_lengths(self, model: str, captions: list[str], max_length: int | None) -> tuple[list[int], int]:
        from .flux1_text import t5_lengths
        return t5_lengths(model, captions, max_length)

    def load_text_encoder(self, model, device, dtype, *, mode, max_length, compile=False, options=None,
                          precision="bf16"):
        from .flux1_text import Flux1TextEncoder
        return Flux1TextEncoder(model, device, dtype, mode=mode, max_length=max_length, compile=compile,
                                options=options, precision=precision)


FLUX1 = Flux1()
