"""Tiny FLUX.2 folders: FLUX.2 [klein] and [dev]'s real classes at toy sizes, in diffusers' layout.

Like shared/tiny.py for FLUX.1: built offline (the tokenizers too), deterministic for a seed, safetensors
only, and loadable with `Flux2KleinPipeline` / `Flux2Pipeline.from_pretrained`, so FLUX.2 code runs on a CPU.

What is real: the classes, the text-layer taps (9, 18, 27 for Qwen3; 10, 20, 30 for Mistral 3) as
intermediate layers, the chat-template semantics the pipelines rely on, the VAE's 2x2 patchify + BatchNorm
normalisation (with non-trivial statistics) and the scheduler config. What is toy: every width and depth
(shared/presets_flux2.py "flux2-tiny"), and 8 latent channels instead of 32.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .presets_flux2 import FLUX2_PRESETS
from .schedules import BASE_SEQ_LEN, BASE_SHIFT, MAX_SEQ_LEN, MAX_SHIFT
from .tiny import VOCAB_WORDS
from .tiny_vae import set_pooling_weights

TEXT_WIDTH = 16                   # hidden size of both tiny text encoders: 3 x 16 = joint_attention_dim 48
TEXT_MAX_POSITIONS = 512          # the pipelines pad prompts to 512 tokens
# The last hidden state is the final-normed one; the taps must stay intermediate layers, as in the real
# encoders (Qwen3-4B/8B: 36 layers, Mistral-Small-3.x: 40), so one layer more than the last tap.
QWEN3_LAYERS = 28                 # taps (9, 18, 27)
MISTRAL_LAYERS = 31               # taps (10, 20, 30)
LATENT_CHANNELS = 8               # the real VAE has 32; the transformer takes 4 x this (2x2 patchify)
VAE_WIDTH = 16                    # 4 levels (8x downsampling, as the real VAE), GroupNorm groups of 4
TOKEN_WORDS = (*VOCAB_WORDS, "user", "assistant", "system")

# Qwen3's chat template, its semantics for the roles the pipelines use (no tools): ChatML turns, and an
# empty think block after the generation prompt when enable_thinking is false (as Qwen3's own template).
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)

# Mistral-Small-3.x's template, its semantics for what Flux2Pipeline sends: bos, the system prompt in
# [SYSTEM_PROMPT] ... [/SYSTEM_PROMPT], user turns in [INST] ... [/INST] (content a string or a list of
# text/image blocks; an image block is [IMG]), assistant turns closed by eos.
MISTRAL_CHAT_TEMPLATE = (
    "{%- macro text(content) %}{%- if content is string %}{{- content }}{%- else %}"
    "{%- for block in content %}{%- if block['type'] == 'text' %}{{- block['text'] }}"
    "{%- elif block['type'] in ['image', 'image_url'] %}{{- '[IMG]' }}{%- endif %}{%- endfor %}"
    "{%- endif %}{%- endmacro %}"
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{- '[SYSTEM_PROMPT]' + text(message['content']) + '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' %}{{- '[INST]' + text(message['content']) + '[/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}{{- text(message['content']) + eos_token }}{%- endif %}"
    "{%- endfor %}"
)

# Mistral's tekken tokenizer: control tokens first (these ids as in Mistral-Small-3.x; the gaps are
# placeholders), then bytes and merges. Its pre-tokenizer regex, as transformers' `fix_mistral_regex`.
MISTRAL_SPECIALS = {0: "<unk>", 1: "<s>", 2: "</s>", 3: "[INST]", 4: "[/INST]", 10: "[IMG]", 11: "<pad>",
                    12: "[IMG_BREAK]", 13: "[IMG_END]", 17: "[SYSTEM_PROMPT]", 18: "[/SYSTEM_PROMPT]"}
MISTRAL_REGEX = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
                 r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _seeded(seed: int, offset: int) -> None:
    torch.manual_seed(seed * 1000 + offset)


def _byte_bpe(regex: str, specials=()):
    """A byte-level BPE (regex split, then bytes) trained on TOKEN_WORDS, each alone and after a space (and
    on a blank line), until each is one token. The trainer breaks ties by token id: deterministic merges."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=100_000, min_frequency=1, show_progress=False,
                                  special_tokens=list(specials), initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([w for word in TOKEN_WORDS for w in (word, " " + word)] + ["\n\n"], trainer)
    return tok


def build_qwen3_tokenizer():
    """Qwen2TokenizerFast as Qwen3's: byte-level BPE, <|endoftext|> (pad) <|im_start|> <|im_end|> (eos)
    after the BPE vocabulary, <think> </think> as plain added tokens, the ChatML template."""
    from tokenizers import AddedToken
    from transformers import Qwen2TokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
    model = json.loads(_byte_bpe(PRETOKENIZE_REGEX).to_str())["model"]
    vocab = dict(model["vocab"])
    for token in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"):
        vocab[token] = len(vocab)
    tok = Qwen2TokenizerFast(vocab=vocab, merges=[tuple(m) for m in model["merges"]], unk_token=None,
                             eos_token="<|im_end|>", pad_token="<|endoftext|>",
                             model_max_length=131072, chat_template=QWEN3_CHAT_TEMPLATE)
    tok.add_special_tokens({"extra_special_tokens": ["<|im_start|>"]})
    tok.add_tokens([AddedToken("<think>", special=False), AddedToken("</think>", special=False)])
    return tok


def build_mistral_tokenizer():
    """A byte-level BPE tokenizer laid out as Mistral's tekken, with the Mistral-Small chat template."""
    from transformers import PreTrainedTokenizerFast
    specials = [MISTRAL_SPECIALS.get(i, f"<SPECIAL_{i}>") for i in range(max(MISTRAL_SPECIALS) + 2)]
    tok = PreTrainedTokenizerFast(
        tokenizer_object=_byte_bpe(MISTRAL_REGEX, specials), bos_token="<s>", eos_token="</s>",
        unk_token="<unk>", pad_token="<pad>", model_max_length=131072, chat_template=MISTRAL_CHAT_TEMPLATE)
    tok.add_special_tokens({"extra_special_tokens": [t for t in specials if t not in tok.all_special_tokens]})
    return tok


def _qwen3(tok):
    from transformers import Qwen3Config, Qwen3ForCausalLM
    return Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tok), hidden_size=TEXT_WIDTH, intermediate_size=2 * TEXT_WIDTH,
        num_hidden_layers=QWEN3_LAYERS, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
        max_position_embeddings=TEXT_MAX_POSITIONS, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        tie_word_embeddings=True,     # as Qwen3-4B
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id))


def _mistral3(tok):
    """Mistral3ForConditionalGeneration with the smallest vision tower it takes (1 layer, width 8)."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration
    text = dict(model_type="mistral", vocab_size=len(tok), hidden_size=TEXT_WIDTH,
                intermediate_size=2 * TEXT_WIDTH, num_hidden_layers=MISTRAL_LAYERS, num_attention_heads=2,
                num_key_value_heads=1, head_dim=8, max_position_embeddings=TEXT_MAX_POSITIONS,
                rope_parameters={"rope_type": "default", "rope_theta": 1e9}, sliding_window=None, rms_norm_eps=1e-5,
                tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)
    vision = dict(model_type="pixtral", hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                  num_attention_heads=2, image_size=32, patch_size=8, num_channels=3)
    return Mistral3ForConditionalGeneration(Mistral3Config(
        text_config=text, vision_config=vision, image_token_index=tok.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=2, projector_hidden_act="gelu", multimodal_projector_bias=False,
        vision_feature_layer=-1, tie_word_embeddings=False))


def _bn_stats(vae, seed: int, kind: str) -> None:
    """Seeded, non-trivial BatchNorm statistics, so that the pipelines' normalisation of the 2x2-patchified
    latent, (x - running_mean) / sqrt(running_var + eps), is exercised (channel c*4 + k: latent channel c,
    patch position k).

    pooling: one mean m_c and std s_c per latent channel, and the encoder's latent mean set to x0 * s_c + m_c,
    so that the normalised latent x0 is exactly the 8x8 block colour (0 on channels 3..7).
    random: an independent mean and variance per patchified channel."""
    g = torch.Generator().manual_seed(seed * 1000 + 5)
    eps = vae.config.batch_norm_eps
    if kind == "pooling":
        mean = torch.rand(LATENT_CHANNELS, generator=g, dtype=torch.float64) - 0.5            # in [-0.5, 0.5)
        std = 0.5 + 1.5 * torch.rand(LATENT_CHANNELS, generator=g, dtype=torch.float64)       # in [0.5, 2)
        set_pooling_weights(vae, shift=mean.tolist(), scale=(1.0 / std).tolist())
        mean, var = mean.repeat_interleave(4), (std**2 - eps).repeat_interleave(4)
    else:
        n = vae.bn.num_features
        mean = 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
        var = 0.5 + 1.5 * torch.rand(n, generator=g, dtype=torch.float64)
    vae.bn.running_mean.copy_(mean)
    vae.bn.running_var.copy_(var)


def _check_vae_kind(kind: str) -> None:
    if kind not in ("pooling", "random"):
        raise ValueError(f"unknown tiny VAE kind {kind!r}; use 'pooling' or 'random'")


def _flux2_vae(seed: int, kind: str):
    """AutoencoderKLFlux2 as the real one (8x, quant convs, mid attention, BatchNorm over 4 x latent
    channels) at width 16, 8 latent channels."""
    from diffusers import AutoencoderKLFlux2
    _seeded(seed, 3)
    vae = AutoencoderKLFlux2(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(VAE_WIDTH,) * 4, layers_per_block=1,
        latent_channels=LATENT_CHANNELS, norm_num_groups=VAE_WIDTH // 4, sample_size=64)
    with torch.no_grad():
        _bn_stats(vae, seed, kind)
    return vae


def _scheduler():
    """FLUX.1 [dev]'s scheduler config, which diffusers' convert_flux2_to_diffusers.py copies into the FLUX.2
    folders. Flux2 pipelines pass their own mu (compute_empirical_mu), so the shift values are unused there."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=BASE_SHIFT,
        max_shift=MAX_SHIFT, base_image_seq_len=BASE_SEQ_LEN, max_image_seq_len=MAX_SEQ_LEN)


def _flux2_transformer(seed: int, guidance_embeds: bool):
    from diffusers import Flux2Transformer2DModel
    cfg = dict(FLUX2_PRESETS["flux2-tiny"].transformer, guidance_embeds=guidance_embeds)
    if cfg["in_channels"] != 4 * LATENT_CHANNELS:
        raise ValueError("the tiny transformer's in_channels must be 4 x the tiny VAE's latent channels")
    _seeded(seed, 4)
    return Flux2Transformer2DModel(**cfg)


def build_tiny_flux2_klein(seed: int = 0, distilled: bool = False, vae: str = "pooling"):
    """A Flux2KleinPipeline of the real classes at toy sizes, random weights drawn from `seed`.

    vae="pooling" hand-sets the VAE so that the normalised latent is each 8x8 block's colour
    (shared/tiny_vae.py); vae="random" leaves it random. `distilled` is model_index.json's is_distilled."""
    from diffusers import Flux2KleinPipeline
    _check_vae_kind(vae)
    tok = build_qwen3_tokenizer()
    _seeded(seed, 1)
    text_encoder = _qwen3(tok)
    return Flux2KleinPipeline(scheduler=_scheduler(), vae=_flux2_vae(seed, vae), text_encoder=text_encoder,
                              tokenizer=tok, transformer=_flux2_transformer(seed, False), is_distilled=distilled)


def build_tiny_flux2_dev(seed: int = 0, vae: str = "pooling"):
    """A Flux2Pipeline (FLUX.2 [dev]) of the real classes at toy sizes; the transformer has the guidance
    embedding. The tokenizer is the bare tokenizer, not a PixtralProcessor: see write_tiny_flux2_dev."""
    from diffusers import Flux2Pipeline
    _check_vae_kind(vae)
    tok = build_mistral_tokenizer()
    _seeded(seed, 2)
    text_encoder = _mistral3(tok)
    return Flux2Pipeline(scheduler=_scheduler(), vae=_flux2_vae(seed, vae), text_encoder=text_encoder,
                         tokenizer=tok, transformer=_flux2_transformer(seed, True))


def _save(pipe, out_dir) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def write_tiny_flux2_klein(out_dir, seed: int = 0, distilled: bool = False, vae: str = "pooling") -> Path:
    """Write a tiny FLUX.2 [klein] folder (model_index.json, transformer/, vae/, text_encoder/ = Qwen3,
    tokenizer/, scheduler/), safetensors only. See `build_tiny_flux2_klein`."""
    return _save(build_tiny_flux2_klein(seed, distilled, vae), out_dir)


def write_tiny_flux2_dev(out_dir, seed: int = 0, vae: str = "pooling") -> Path:
    """Write a tiny FLUX.2 [dev] folder (text_encoder/ = Mistral3ForConditionalGeneration).

    The real folder's tokenizer/ is a PixtralProcessor, which transformers 5.25 only builds with torchvision
    (absent here). Flux2Pipeline uses it only through apply_chat_template for text prompts, which the bare
    tokenizer answers the same way, so the tiny folder stores the tokenizer itself."""
    return _save(build_tiny_flux2_dev(seed, vae), out_dir)
