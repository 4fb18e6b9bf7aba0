"""FLUX.2's text encoder: Qwen3 ([klein]) or Mistral 3 ([dev]), the one a model folder has, loaded once,
encoding captions for the cache, sample prompts and flux-sample alike.

The prompt embedding is diffusers' own (Flux2KleinPipeline._get_qwen3_prompt_embeds,
Flux2Pipeline._get_mistral_3_small_prompt_embeds): the prompt in the encoder's chat template, padded to
512 tokens, and the hidden states of three intermediate layers side by side (3 x the encoder's width). The
padding mask applies inside the encoder only: FLUX.2's transformer attends all 512 positions, so the
padded states are what the cache keeps ("padded" is the only text mode).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models import ModelLoadError, load_part, model_identity, model_index, part_config
from ..text_batch import PromptEncoding

MAX_LENGTH = 512            # both pipelines' max_sequence_length (their tokenizer_max_length)


@dataclass(frozen=True)
class TextVariant:
    """One of FLUX.2's text encoders: its transformers class and the hidden-state layers the pipeline taps."""
    encoder_class: str
    layers: tuple[int, ...]
    label: str

    def prompt_embeds(self, encoder, tokenizer, prompts: list[str], max_length: int, device) -> torch.Tensor:
        """[B, max_length, len(layers) x width]: the pipeline's own function, run on `encoder`."""
        from diffusers import Flux2KleinPipeline, Flux2Pipeline
        helper = (Flux2KleinPipeline._get_qwen3_prompt_embeds if self is QWEN3
                  else Flux2Pipeline._get_mistral_3_small_prompt_embeds)
        return helper(encoder, tokenizer, prompts, device=device, max_sequence_length=max_length,
                      hidden_states_layers=self.layers)

    def attention_mask(self, tokenizer, prompts: list[str], max_length: int) -> torch.Tensor:
        """[B, max_length]: the real tokens of each prompt as the pipeline tokenizes it (its chat template)."""
        if self is QWEN3:   # as _get_qwen3_prompt_embeds: one prompt at a time, thinking off
            texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                   add_generation_prompt=True, enable_thinking=False) for p in prompts]
            return tokenizer(texts, padding="max_length", truncation=True, max_length=max_length,
                             return_tensors="pt").attention_mask
        from diffusers.pipelines.flux2.pipeline_flux2 import SYSTEM_MESSAGE, format_input
        return tokenizer.apply_chat_template(format_input(prompts, system_message=SYSTEM_MESSAGE),
                                             add_generation_prompt=False, tokenize=True, return_dict=True,
                                             return_tensors="pt", padding="max_length", truncation=True,
                                             max_length=max_length)["attention_mask"]


# [diffusers-pipe] (shared/presets_flux2.py): the layers each pipeline stacks.
QWEN3 = TextVariant("Qwen3ForCausalLM", (9, 18, 27), "Qwen3")
MISTRAL3 = TextVariant("Mistral3ForConditionalGeneration", (10, 20, 30), "Mistral 3")
VARIANTS = {v.encoder_class: v for v in (QWEN3, MISTRAL3)}


def text_encoder_class(model: str) -> str:
    """The text encoder's transformers class: model_index.json's, else its config's architectures."""
    index = model_index(model) or {}
    entry = index.get("text_encoder")
    if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1]:
        return str(entry[1])
    archs = (part_config(model, "text_encoder") or {}).get("architectures") or []
    if not archs:
        raise ModelLoadError(f"{model}: neither model_index.json nor text_encoder/config.json names the text "
                             "encoder's class")
    return str(archs[0])


def text_variant(model: str) -> TextVariant:
    name = text_encoder_class(model)
    try:
        return VARIANTS[name]
    except KeyError:
        raise ModelLoadError(f"{model}: text encoder {name!r} is not one of FLUX.2's "
                             f"({', '.join(VARIANTS)})") from None


def text_width(config: dict) -> int:
    """The decoder's hidden size from a text encoder config (Mistral 3 nests it in text_config)."""
    return int((config.get("text_config") or config)["hidden_size"])


def text_dims(model: str) -> dict:
    """{"text_dim": layers x width} from the folder's configs, no weights read."""
    variant = text_variant(model)
    return {"text_dim": len(variant.layers) * text_width(part_config(model, "text_encoder"))}


def load_tokenizer(model: str):
    """The tokenizer/ part with AutoTokenizer: Qwen2TokenizerFast for [klein]; for [dev] the tokenizer inside
    its PixtralProcessor folder (Flux2Pipeline uses the processor only through apply_chat_template for text
    prompts, which the tokenizer answers alike; the tiny [dev] folder stores the tokenizer alone)."""
    from transformers import AutoTokenizer
    return load_part(AutoTokenizer.from_pretrained, model, "tokenizer", trust_remote_code=False)


def load_encoder(model: str, variant: TextVariant, dtype, device):
    """The text encoder's decoder stack alone (Qwen3Model / MistralModel): the pipelines read only its hidden
    states, so the language-model head (151k x width logits for all 512 positions, for Qwen3) and Mistral's
    vision tower are left out."""
    import transformers
    cls = getattr(transformers, variant.encoder_class)
    full = load_part(cls.from_pretrained, model, "text_encoder", dtype=dtype, use_safetensors=True,
                     trust_remote_code=False)
    decoder = full.get_decoder()
    layers = decoder.config.num_hidden_layers
    if layers < max(variant.layers):
        raise ModelLoadError(f"{model}: the {variant.label} text encoder has {layers} layers; FLUX.2 takes the "
                             f"hidden states of layers {variant.layers}")
    return decoder.to(device).eval().requires_grad_(False)


def check_mode(mode: str) -> None:
    if mode != "padded":
        raise ValueError(f"text mode {mode!r}: FLUX.2's transformer attends every one of the padded text "
                         "positions (its pipelines pass no text mask), so only text mode 'padded' gives what it "
                         "was trained on")


def text_lengths(model: str, captions: list[str], max_length: int | None) -> tuple[list[int], int]:
    """Each caption's real text tokens (the chat template's included) as encode counts them, and the length."""
    length = max_length or MAX_LENGTH
    if not captions:
        return [], length
    mask = text_variant(model).attention_mask(load_tokenizer(model), captions, length)
    return mask.sum(1).tolist(), length


class Flux2TextEncoder:
    """A FLUX.2 folder's text encoder, loaded once. `encode` gives a batch's cache columns ({"text",
    "text_len"}); `prompt_encodings` gives prompts one PromptEncoding each, as the sampler takes them."""

    def __init__(self, model: str, device, dtype: torch.dtype, *, mode: str, max_length: int | None,
                 compile: bool = False, options: dict | None = None, precision: str = "bf16"):
        from ..text_float8 import check_text_precision, decoder_to_float8, refuse_none
        check_mode(mode)
        check_text_precision(precision, device)
        if options:
            raise ValueError(f"FLUX.2's text encoder takes no options (got {', '.join(sorted(options))})")
        self.device, self.dtype, self.mode = torch.device(device), dtype, mode
        self.max_length = max_length or MAX_LENGTH
        self.variant = text_variant(model)
        self.tokenizer = load_tokenizer(model)
        self.encoder = load_encoder(model, self.variant, dtype, self.device)
        if precision == "fp8":
            refuse_none(decoder_to_float8(self.encoder), f"the {self.variant.label} text encoder")
        if compile:   # static shapes: every batch is max_length tokens long
            for layer in self.encoder.layers:
                layer.compile(dynamic=False)
        self.identities = {"text": model_identity(model, "text_encoder", f"the {self.variant.label} text encoder")}

    def dims(self) -> dict:
        return {"text_dim": len(self.variant.layers) * int(self.encoder.config.hidden_size)}

    def facts(self) -> dict:
        return {}

    @torch.inference_mode()
    def encode(self, captions: list[str]) -> dict:
        """{"text": [B, max_length, D], "text_len": [B]} on the device."""
        states = self.variant.prompt_embeds(self.encoder, self.tokenizer, captions, self.max_length, self.device)
        mask = self.variant.attention_mask(self.tokenizer, captions, self.max_length)
        return {"text": states, "text_len": mask.sum(1).to(self.device)}

    @torch.no_grad()
    def prompt_encodings(self, prompts: list[str], batch_size: int = 8) -> list[PromptEncoding]:
        """Every prompt's encoding, made up front (the encoder can then leave memory): all max_length states."""
        out = []
        for start in range(0, len(prompts), batch_size):
            states = self.variant.prompt_embeds(self.encoder, self.tokenizer, prompts[start:start + batch_size],
                                                self.max_length, self.device)
            out.extend(PromptEncoding(s.clone()) for s in states)
        return out
