"""What a model family is to the stages: the small object each stage asks instead of naming an encoder.

A family owns what differs between FLUX.1 and FLUX.2 (docs/DESIGN.md, "Model families"): the parts a
model folder has; which text encoder `encode` runs and the cache columns it fills (TextSpec); how a VAE
posterior becomes the transformer's x0 and its tokens (normalisation, patches, position ids); the one
prediction function the trainer and the sampler both call; the block lists that checkpointing, block swap,
FSDP and compile walk; default LoRA targets; the sampling schedule. The stages hold the rest: data,
loops, files. Subclasses: family/flux1.py, family/flux2.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

TEXT_MODES = ("padded", "trimmed")
# Reference images' sides are multiples of this: the VAE divides by 8 and the transformer packs 2x2 patches
# (the edit pipelines' multiple_of = vae_scale_factor * 2).
REFERENCE_MULTIPLE = 16


def area_capped(width: int, height: int, area: int) -> tuple[int, int]:
    """(width, height) scaled down to about `area` pixels keeping the aspect, where larger: diffusers'
    Flux2ImageProcessor._resize_to_target_area arithmetic (int() of each scaled side)."""
    if width * height <= area:
        return width, height
    scale = math.sqrt(area / (width * height))
    return int(width * scale), int(height * scale)


@dataclass(frozen=True)
class TextSpec:
    """The cache's text columns of a family: token states [L, D] and their real-token count, and a pooled
    vector [Dp] where the family has one. Their names are the cache's column names, and name the manifest's
    text section (`manifest[states]`: mode, max_length) and dims (`{states}_dim`, `{pooled}_dim`)."""
    states: str
    length: str
    pooled: str | None
    modes: tuple[str, ...]        # the text modes this family's transformer can be trained on
    label: str                    # the encoder, in messages ("T5", "Qwen3")
    pooled_label: str | None = None   # the pooled vector's encoder, in messages ("CLIP")

    @property
    def tensor_columns(self) -> tuple[str, ...]:
        return (self.states,) + ((self.pooled,) if self.pooled else ())

    def dim_keys(self) -> dict[str, str]:
        """{column: its manifest dims key}."""
        return {c: f"{c}_dim" for c in self.tensor_columns}

    def settings(self, manifest: dict) -> dict:
        """The cache's text settings: {"mode", "max_length"}."""
        return manifest[self.states]


class Family:
    """The interface every family implements; defaults are what FLUX.1 and FLUX.2 share."""
    name: str
    pipelines: tuple[str, ...]        # model_index.json `_class_name`s of this family's folders
    transformer_class: str            # diffusers' class names
    vae_class: str
    lora_pipeline: str                # the diffusers pipeline whose save/load_lora_weights the adapters follow
    text: TextSpec
    parts: dict[str, str]             # a model folder's parts -> what each is (for messages)
    text_parts: tuple[str, ...]       # the parts its text encoder loads
    block_lists = ("transformer_blocks", "single_transformer_blocks")
    default_lora_targets: str
    float8_keep: tuple[str, ...] = ("x_embedder", "proj_out")   # first and last layers stay bf16
    # Modules outside the blocks that a quantized base (model.quantize_base) quantizes too: those large enough
    # to matter (FLUX.1's are about 50M parameters, left bf16; FLUX.2's shared modulation layers are 0.3-0.8B)
    quantize_outside: tuple[str, ...] = ()
    vae_fact_keys: tuple[str, ...] = ()        # what vae_facts records, all of which to_x0 needs
    manifest_facts: tuple[str, ...] = ()       # the text encoder's facts the manifest records (compared on a rerun)
    settings_only: tuple[str, ...] = ()        # its facts the encode settings record, not compared
    sampling_text_options: dict = {}           # the text encoder's options as flux-sample runs it

    def __repr__(self) -> str:
        return f"<family {self.name}>"

    # -- classes and blocks ---------------------------------------------------------------------
    def transformer_cls(self):
        import diffusers
        return getattr(diffusers, self.transformer_class)

    def vae_cls(self):
        import diffusers
        return getattr(diffusers, self.vae_class)

    def blocks(self, model) -> list[torch.nn.Module]:
        """The repeated blocks in the order the forward runs them: the double-stream ones, then the single."""
        return [block for name in self.block_lists for block in getattr(model, name)]

    def per_sample_layer(self, name: str) -> bool:
        """Whether a linear layer sees one row per image, not per token (modulation, time embedding)."""
        raise NotImplementedError

    # -- latents ---------------------------------------------------------------------------------
    def vae_facts(self, vae) -> dict:
        """What the cache's manifest records of the VAE so that the trainer can normalise without it."""
        raise NotImplementedError

    def to_x0(self, latent: torch.Tensor, facts: dict) -> torch.Tensor:
        """A VAE posterior mean (or sample) [B, C, h, w] -> the transformer's x0, float32."""
        raise NotImplementedError

    def from_x0(self, x0: torch.Tensor, facts: dict) -> torch.Tensor:
        """The inverse of to_x0: what the VAE decoder takes."""
        raise NotImplementedError

    def x0_shape(self, channels: int, h: int, w: int) -> tuple[int, int, int]:
        """The shape of one x0 for a latent of `channels` x h x w (the VAE's own)."""
        raise NotImplementedError

    def pack(self, x0: torch.Tensor) -> torch.Tensor:
        """x0-shaped [B, ...] -> the transformer's image tokens [B, N, D]."""
        raise NotImplementedError

    def unpack(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Tokens [B, N, D] of an h x w latent (the VAE's size) -> x0-shaped [B, ...]."""
        raise NotImplementedError

    def mask_tokens(self, mask: torch.Tensor, channels: int) -> torch.Tensor:
        """A loss mask at latent resolution [B, h, w] -> [B, N, D], laid out as `pack(x0)`: each token value
        weighted by the mask of the latent cell it came from (a latent of `channels` channels)."""
        return self.pack(mask[:, None].expand(-1, channels, -1, -1))

    def image_tokens(self, h: int, w: int) -> int:
        """Image tokens of an h x w latent: 2x2 patches in every FLUX."""
        return (h // 2) * (w // 2)

    # -- reference images (edit training) -----------------------------------------------------------
    def reference_area(self, count: int) -> int:
        """The family's own area cap (pixels) of each of `count` reference images."""
        raise NotImplementedError

    def reference_resize(self, width: int, height: int, count: int, override: int | None = None) -> tuple[int, int]:
        """The size a `width` x `height` reference (one of `count`) is resized to before reference_size's
        centre crop: scaled down to the area cap (`override`^2 pixels, --reference-resolution, else the
        family's), keeping the aspect."""
        return area_capped(width, height, override * override if override else self.reference_area(count))

    def reference_size(self, width: int, height: int, count: int, override: int | None = None) -> tuple[int, int]:
        """(w, h) in pixels a reference image is encoded at: reference_resize's size floored to multiples of
        REFERENCE_MULTIPLE (the pipelines crop the rest, centred)."""
        w, h = self.reference_resize(width, height, count, override)
        return w // REFERENCE_MULTIPLE * REFERENCE_MULTIPLE, h // REFERENCE_MULTIPLE * REFERENCE_MULTIPLE

    # -- the transformer call ----------------------------------------------------------------------
    max_references: int | None = None   # reference images the family places (None: any number)

    def predict(self, model, tokens: torch.Tensor, timestep: torch.Tensor, text, h: int, w: int,
                guidance: float | None = None, flex_mask: bool = False, refs=(),
                ref_keep: torch.Tensor | None = None) -> torch.Tensor:
        """The velocity of image tokens [B, N, D] at `timestep` [B] (in [0, 1]), for `text` (a TextBatch)
        and an h x w latent; `guidance` feeds a guidance embedding. `refs`: reference images, each
        (tokens [B, Nr, D] of its packed x0, its latent h, w), placed after the noisy tokens at the family's
        positions (reference_ids); the prediction covers the noisy tokens only. `ref_keep` [B] bool: where
        False, no token attends to that sample's references (exactly as if it had none: reference dropout).
        The one transformer call of the trainer and of the sampler."""
        raise NotImplementedError

    def reference_ids(self, h: int, w: int, index: int, device=None) -> torch.Tensor:
        """Position ids of reference image `index`'s tokens (an h x w latent)."""
        raise NotImplementedError

    def check_references(self, count: int, where: str) -> None:
        """Refuse more reference images than the family places."""
        if self.max_references is not None and count > self.max_references:
            raise ValueError(f"{where}: {count} reference images; {self.name} places at most {self.max_references}")

    # -- sampling ----------------------------------------------------------------------------------
    default_guidance: float = 3.5        # a guidance embedding's value when nothing says otherwise

    def default_shift(self, scheduler_config: dict | None) -> bool:
        """Whether a published model's schedule is shifted by its image-token count."""
        return True

    def default_steps(self, shift: bool, model_index: dict | None) -> int:
        """Sampling steps of a published model of this family."""
        raise NotImplementedError

    def default_cfg(self, model_index: dict | None, guidance_embeds: bool) -> float:
        """True CFG scale of a published model of this family (1: off)."""
        return 1.0

    def sampling_sigmas(self, steps: int, image_tokens: int, shift: bool) -> torch.Tensor:
        """`steps + 1` noise levels from 1 down to 0 (float32), as the family's pipeline takes them."""
        raise NotImplementedError

    # -- other tools' layouts -------------------------------------------------------------------
    bfl_modules: tuple[str, str]      # Black Forest Labs' single-file layout and its kohya LoRA names (modules)
    modelspec_names: dict             # sd-scripts' metadata: architecture by guidance embedding, LoRA module, base

    def bfl(self):
        """The module of Black Forest Labs' layout of this family's transformer: key_map, diffusers_to_bfl,
        bfl_to_diffusers, config_from_shapes, config_from_diffusers_shapes, transformer_from_state,
        load_bfl_transformer."""
        import importlib
        return importlib.import_module(self.bfl_modules[0])

    def bfl_lora(self):
        """The module that writes this family's LoRA in kohya's names of BFL's layout: peft_to_kohya."""
        import importlib
        return importlib.import_module(self.bfl_modules[1])

    # -- checks ------------------------------------------------------------------------------------
    def misfits(self, tcfg, dims: dict) -> dict[str, tuple]:
        """{check: (the transformer's size, the size given)} for each input size that does not fit
        `dims` (the VAE's latent_channels and the text columns' widths)."""
        get = tcfg.get if isinstance(tcfg, dict) else lambda k: getattr(tcfg, k, None)
        in_ch = get("in_channels")
        out_ch = get("out_channels") or in_ch
        checks = {"latent_channels": (in_ch, 4 * dims["latent_channels"]), "out_channels": (out_ch, in_ch),
                  self.text.dim_keys()[self.text.states]: (get("joint_attention_dim"),
                                                           dims[self.text.dim_keys()[self.text.states]])}
        checks.update(self._more_misfits(get, dims))
        return {k: v for k, v in checks.items() if v[0] != v[1]}

    def _more_misfits(self, get, dims: dict) -> dict:
        return {}

    def text_dims(self, model: str) -> dict:
        """The text columns' widths ({"t5_dim": ..., ...}) from the model folder's configs, no weights read."""
        raise NotImplementedError

    def text_lengths(self, model: str, captions: list[str], max_length: int | None) -> tuple[list[int], int]:
        """Each caption's real text tokens as encode counts them, and the max length (tokenizer only)."""
        raise NotImplementedError

    def load_text_encoder(self, model: str, device, dtype: torch.dtype, *, mode: str, max_length: int | None,
                          compile: bool = False, options: dict | None = None, precision: str = "bf16"):
        """The family's text encoder (a TextEncoder: encode, empty, prompt_encodings, identities, dims, facts);
        `precision` fp8: its large matmuls in float8 (shared/text_float8.py)."""
        raise NotImplementedError


def joint_mask(text_mask: torch.Tensor | None, text_len: int, noisy: int, refs: int,
               ref_keep: torch.Tensor | None) -> torch.Tensor | None:
    """[B, 1, 1, L + S] bool over the joint sequence (text, noisy tokens, `refs` reference tokens; True =
    attended), for joint_attention_kwargs' attention_mask; None when nothing is masked. A sample whose
    `ref_keep` is False attends none of its reference tokens: its text and noisy tokens see what they would
    without references (tokens interact only through attention, and the references' outputs are dropped)."""
    if text_mask is None and (ref_keep is None or not refs):
        return None
    like = text_mask if text_mask is not None else ref_keep
    b, device = like.shape[0], like.device
    parts = [text_mask.bool() if text_mask is not None else torch.ones(b, text_len, dtype=torch.bool, device=device),
             torch.ones(b, noisy, dtype=torch.bool, device=device)]
    if refs:
        parts.append(torch.ones(b, refs, dtype=torch.bool, device=device) if ref_keep is None
                     else ref_keep.bool()[:, None].expand(b, refs))
    return torch.cat(parts, dim=1)[:, None, None, :]
