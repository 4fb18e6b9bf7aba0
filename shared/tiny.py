"""The tiny model folder: FLUX's real classes at toy sizes, in diffusers' folder layout.

Everything is built offline (the tokenizers too), deterministic for a seed, and loads
with `FluxPipeline.from_pretrained`, so every stage can be exercised on a CPU.
"""
from __future__ import annotations

import string
from pathlib import Path

import torch

from .latents import LATENT_CHANNELS, VAE_SCALE, VAE_SHIFT
from .presets import get_preset
from .schedules import BASE_SEQ_LEN, BASE_SHIFT, MAX_SEQ_LEN, MAX_SHIFT
from .tiny_vae import set_pooling_weights

# Words of the demo grammar get whole-word tokens; anything else falls back to characters.
VOCAB_WORDS = ("a an the of on in with and red green blue yellow orange purple white black gray "
               "circle square triangle background photo image small large big two three").split()
CLIP_MAX_LENGTH = 77


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP byte-level BPE alphabet: every byte as a printable character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, extra = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return [chr(c) for c in cs]


def build_clip_tokenizer():
    from transformers import CLIPTokenizer
    alphabet = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({c + "</w>": len(alphabet) + i for i, c in enumerate(alphabet)})
    merges = []
    for word in VOCAB_WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        merged = pieces[0]
        for piece in pieces[1:]:
            if (merged, piece) not in merges:
                merges.append((merged, piece))
            merged += piece
            vocab.setdefault(merged, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LENGTH)


def build_t5_tokenizer(max_length: int):
    from transformers import T5Tokenizer
    chars = string.ascii_letters + string.digits + string.punctuation
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -1.0) for w in VOCAB_WORDS]
    vocab += [(c, -5.0) for c in chars] + [("▁" + c, -4.0) for c in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)


def build_tiny_pipeline(seed: int = 0, guidance_embeds: bool = False, vae: str = "pooling"):
    """A FluxPipeline of the real classes at toy sizes, random weights drawn from `seed`.

    vae="pooling" hand-sets the VAE to an exact 8x8 colour pooling (shared/tiny_vae.py) so that
    decoded samples are pictures; vae="random" leaves it randomly initialised."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    preset = get_preset("tiny")
    cfg = dict(preset.transformer, guidance_embeds=guidance_embeds)
    clip_tok = build_clip_tokenizer()
    t5_tok = build_t5_tokenizer(preset.t5_max_length)

    def seeded(offset: int):
        torch.manual_seed(seed * 1000 + offset)

    seeded(1)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip_tok), hidden_size=cfg["pooled_projection_dim"], intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=CLIP_MAX_LENGTH,
        projection_dim=cfg["pooled_projection_dim"], bos_token_id=clip_tok.bos_token_id,
        eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.pad_token_id))
    seeded(2)
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tok), d_model=cfg["joint_attention_dim"], d_kv=16, d_ff=128, num_layers=2,
        num_heads=4, feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
        relative_attention_max_distance=32, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        is_encoder_decoder=False))
    if vae not in ("pooling", "random"):
        raise ValueError(f"unknown tiny VAE kind {vae!r}; use 'pooling' or 'random'")
    seeded(3)
    autoencoder = AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 32, 32), layers_per_block=1, norm_num_groups=8,
        latent_channels=LATENT_CHANNELS, scaling_factor=VAE_SCALE, shift_factor=VAE_SHIFT,
        use_quant_conv=False, use_post_quant_conv=False, sample_size=64)
    if vae == "pooling":
        set_pooling_weights(autoencoder)
    seeded(4)
    transformer = FluxTransformer2DModel(**cfg)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=BASE_SHIFT, max_shift=MAX_SHIFT,
        base_image_seq_len=BASE_SEQ_LEN, max_image_seq_len=MAX_SEQ_LEN)
    return FluxPipeline(scheduler=scheduler, vae=autoencoder, text_encoder=clip, tokenizer=clip_tok,
                        text_encoder_2=t5, tokenizer_2=t5_tok, transformer=transformer)


def write_tiny_model(out_dir, seed: int = 0, guidance_embeds: bool = False, vae: str = "pooling") -> Path:
    """Write the tiny folder (model_index.json, transformer/, vae/, text_encoder/ = CLIP,
    text_encoder_2/ = T5, tokenizer/, tokenizer_2/, scheduler/), safetensors only.

    See `build_tiny_pipeline` for `vae`."""
    out = Path(out_dir)
    pipe = build_tiny_pipeline(seed, guidance_embeds, vae)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def write_tiny_kontext(out_dir, seed: int = 0, vae: str = "pooling") -> Path:
    """A tiny FLUX.1 Kontext folder: the FLUX.1 tiny parts with Kontext [dev]'s guidance embedding, saved as a
    FluxKontextPipeline (its model_index.json names that pipeline, as Kontext [dev]'s does)."""
    from diffusers import FluxKontextPipeline
    parts = build_tiny_pipeline(seed, guidance_embeds=True, vae=vae).components
    pipe = FluxKontextPipeline(**{k: v for k, v in parts.items() if k not in ("image_encoder", "feature_extractor")})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    return out
