"""FLUX.2's rows of bench/memory.py (--family flux2): [klein] 4B / 9B and [dev] 32B at their real shapes
(random weights), the plain loops' inputs made with diffusers' own helpers, and the encode rows (the
Qwen3-4B text encoder and the FLUX.2 VAE through flux-prep's Encoders and through Flux2KleinPipeline).

Each row carries its goal (`goal`: a peak in GiB, and/or a row whose img/s it must reach) and `est_s`,
the seconds it is expected to take on one H100, start-up included (memory.py starts a row only if the
call's --budget has room for it). With --tiny every row runs at toy size (the flux2-tiny preset, a 64px
image, tiny encoders built by the same code), which is how the tests run them all on a CPU.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

TEXT = 512   # FLUX.2's prompts are padded to 512 tokens and the transformer attends all of them
VARIANTS = {"klein-4B": "flux2-klein-4b", "klein-9B": "flux2-klein-9b", "dev": "flux2-dev"}
ENCODE_BATCH = 8
CAPTIONS = [
    "a red vintage bicycle leaning against a weathered brick wall in a narrow cobblestone alley at golden hour",
    "close-up portrait of an elderly fisherman with a grey beard and a knitted wool cap, soft window light",
    "an isometric illustration of a tiny floating island with a lighthouse, pine trees and a waterfall",
    "a bowl of ramen with a soft-boiled egg, sliced pork, scallions and nori on a dark wooden table",
    "aerial photograph of a winding river through autumn forest, orange and yellow leaves, morning mist",
    "a robot made of brass and glass tending a rooftop vegetable garden in a futuristic city at dusk",
    "minimalist poster of a mountain range under a huge pale moon, flat colours, screen print texture",
    "a golden retriever puppy sleeping on a blue knitted blanket next to a stack of children's books",
]
# Text encoders and VAE, real ([klein] 4B: Qwen3-4B's config.json; [dev]: Mistral-Small-3.2-24B's text
# config; the VAE: AutoencoderKLFlux2's defaults, which diffusers' convert_flux2_to_diffusers.py loads the
# published weights into) and tiny (shared/tiny_flux2.py's sizes: the taps 9/18/27 and 10/20/30 exist).
QWEN3_4B = dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
                rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                tie_word_embeddings=True)
QWEN3_TINY = dict(QWEN3_4B, hidden_size=16, intermediate_size=32, num_hidden_layers=28, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=8, vocab_size=512, max_position_embeddings=TEXT)
MISTRAL_24B = dict(hidden_size=5120, intermediate_size=32768, num_hidden_layers=40, num_attention_heads=32,
                   num_key_value_heads=8, head_dim=128, vocab_size=131072, max_position_embeddings=131072,
                   rms_norm_eps=1e-5, sliding_window=None, rope_parameters={"rope_type": "default", "rope_theta": 1e9})
MISTRAL_TINY = dict(MISTRAL_24B, hidden_size=16, intermediate_size=32, num_hidden_layers=31, num_attention_heads=2,
                    num_key_value_heads=1, head_dim=8, vocab_size=512, max_position_embeddings=TEXT)
VAE_TINY = dict(block_out_channels=(16,) * 4, layers_per_block=1, latent_channels=8, norm_num_groups=4)


def rows(suite: str, tiny: bool) -> list[dict]:
    """The rows of a suite (lora, full, encode, stretch, all), in the order they run: the most wanted
    first, so that a call out of time leaves the least wanted for the next."""
    suites = {"lora": lora_rows(), "full": full_rows(), "encode": encode_rows(), "stretch": stretch_rows()}
    suites["all"] = [r for name in ("lora", "full", "encode", "stretch") for r in suites[name]] + optional_rows()
    if suite not in suites:
        raise SystemExit(f"unknown FLUX.2 suite {suite!r}; choose one of {', '.join(suites)}")
    out = [{"family": "flux2", **r} for r in suites[suite]]
    return [shrink(r) for r in out] if tiny else out


LORA = {"lora.rank": 16, "run.precision": "bf16", "optim.lr": 1e-4}
FULL = {"model.weights_dtype": "bf16", "run.precision": "bf16", "optim.in_backward": True, "optim.grad_clip": 0.0,
        "optim.lr": 1e-5, "optim.name": "adafactor"}
OFFLOAD_ACTS = {"run.offload_activations": True}
KLEIN_STEPS = {"res": 1024, "warmup": 2, "steps": 8}
DEV_STEPS = {"res": 1024, "warmup": 2, "steps": 3}


def lora_rows() -> list[dict]:
    k4 = {**KLEIN_STEPS, "preset": VARIANTS["klein-4B"]}
    k9 = {**KLEIN_STEPS, "preset": VARIANTS["klein-9B"]}
    dev = {**DEV_STEPS, "preset": VARIANTS["dev"]}
    plain4, plain9 = "klein-4B LoRA: plain loop, bf16 base", "klein-9B LoRA: plain loop, bf16 base"
    return [
        {**k4, "kind": "plain-lora", "name": plain4, "est_s": 35},
        {**k4, "kind": "trainer", "name": "klein-4B LoRA: bf16 base", "config": LORA, "goal": {"img_s_of": plain4},
         "est_s": 40},
        # float8 compute under the adapter (run.precision fp8: the frozen base stored and multiplied in float8)
        {**k4, "kind": "trainer", "name": "klein-4B LoRA: fp8 compute", "config": {**LORA, "run.precision": "fp8"},
         "goal": {"img_s_of": plain4, "img_s_factor": 1.5, "peak_gib": 6}, "est_s": 45},
        # the same, and the bf16 base, with run.compile (issue 29: FLUX.1's goals, >= 1.5x and >= 1.2x the plain loop)
        {**k4, "kind": "trainer", "name": "klein-4B LoRA: fp8 compute, compile",
         "config": {**LORA, "run.precision": "fp8", "run.compile": True},
         "goal": {"img_s_of": plain4, "img_s_factor": 1.5, "peak_gib": 6}, "est_s": 90},
        {**k4, "kind": "trainer", "name": "klein-4B LoRA: bf16 base, compile", "config": {**LORA, "run.compile": True},
         "goal": {"img_s_of": plain4, "img_s_factor": 1.2}, "est_s": 90},
        *[{**k4, "kind": "trainer", "name": f"klein-4B LoRA: {q} base", "config": {**LORA, "model.quantize_base": q},
           "goal": {"peak_gib": 6}, "est_s": 45} for q in ("int8", "float8")],
        {**k9, "kind": "plain-lora", "name": plain9, "est_s": 45},
        {**k9, "kind": "trainer", "name": "klein-9B LoRA: int8 base", "config": {**LORA, "model.quantize_base": "int8"},
         "goal": {"peak_gib": 11}, "est_s": 60},
        {**dev, "kind": "trainer", "name": "dev LoRA: float8 base", "config": {**LORA, "model.quantize_base": "float8"},
         "goal": {"peak_gib": 38}, "est_s": 90},
        {**dev, "kind": "trainer", "name": "dev LoRA: nf4 base", "config": {**LORA, "model.quantize_base": "nf4"},
         "goal": {"peak_gib": 22}, "est_s": 100},
        # The same three with each block's saved inputs in host memory (run.offload_activations)
        {**k9, "kind": "trainer", "name": "klein-9B LoRA: int8 base, activations offloaded",
         "config": {**LORA, **OFFLOAD_ACTS, "model.quantize_base": "int8"}, "goal": {"peak_gib": 11}, "est_s": 60},
        {**dev, "kind": "trainer", "name": "dev LoRA: float8 base, activations offloaded",
         "config": {**LORA, **OFFLOAD_ACTS, "model.quantize_base": "float8"}, "goal": {"peak_gib": 38}, "est_s": 90},
        {**dev, "kind": "trainer", "name": "dev LoRA: nf4 base, activations offloaded",
         "config": {**LORA, **OFFLOAD_ACTS, "model.quantize_base": "nf4"}, "goal": {"peak_gib": 22}, "est_s": 100},
        # QLoRA's usual optimizer: the adapter's Adam moments in 8 bits (0.6 GiB less for [dev]'s 101M)
        {**dev, "kind": "trainer", "name": "dev LoRA: nf4 base, activations offloaded, adamw8bit",
         "config": {**LORA, **OFFLOAD_ACTS, "model.quantize_base": "nf4", "optim.name": "adamw8bit"},
         "goal": {"peak_gib": 22}, "est_s": 100},
        # The blocks' 58.5 GiB of bf16 weights in pinned host buffers, which torch's caching host allocator rounds
        # up to powers of two: about 92 GiB of the host's ~119 (the host GiB column says).
        {**dev, "kind": "trainer", "name": "dev LoRA: bf16 base, every block swapped", "same_as": "dev LoRA: bf16 base",
         "config": {**LORA, "run.offload_blocks": "all"}, "goal": {"peak_gib": 12}, "est_s": 120},
        # 64.4 GB of bf16 weights and about 7 GB of activations: fits an H100's 80 GB, or says OOM
        {**dev, "kind": "plain-lora", "name": "dev LoRA: plain loop, bf16 base", "est_s": 70},
    ]


def full_rows() -> list[dict]:
    out = []
    for variant, goal in (("klein-4B", 12), ("klein-9B", 22)):
        base = {**KLEIN_STEPS, "preset": VARIANTS[variant]}
        plain = f"{variant} full: plain loop, adafactor in backward"
        out += [{**base, "kind": "plain-full", "name": plain, "optim": "adafactor",
                 "est_s": 45 if variant == "klein-4B" else 60},
                {**base, "kind": "trainer", "name": f"{variant} full: adafactor in backward", "samples": 1,
                 "config": FULL, "goal": {"peak_gib": goal, "img_s_of": plain},
                 "est_s": 50 if variant == "klein-4B" else 70}]
    # issue 29: a batch that fills the card, the blocks compiled and Adafactor's step compiled (optim.fused),
    # beside the plain per-parameter loop at the same batch; goal MFU >= 40% (FLUX.1's full-weight goal)
    batch = {**KLEIN_STEPS, "preset": VARIANTS["klein-4B"], "batch": 4, "samples": 4}
    plain = "klein-4B full: plain loop, adafactor in backward, batch 4"
    out += [{**batch, "kind": "plain-full", "name": plain, "optim": "adafactor", "est_s": 60},
            {**batch, "kind": "trainer", "name": "klein-4B full: adafactor in backward, batch 4, compile",
             "config": {**FULL, "run.compile": True, "optim.fused": True}, "goal": {"img_s_of": plain, "mfu": 0.40},
             "est_s": 120}]
    return out


def encode_rows() -> list[dict]:
    base = {"preset": VARIANTS["klein-4B"], "res": 1024, "warmup": 2, "steps": 6, "batch": ENCODE_BATCH}
    plain = "klein-4B encode: plain Flux2KleinPipeline loop"
    return [{**base, "kind": "encode-plain", "name": plain, "est_s": 90},   # the first builds the model folder
            {**base, "kind": "encode-project", "name": "klein-4B encode: flux-prep Encoders",
             "goal": {"img_s_of": plain}, "est_s": 60}]


def stretch_rows() -> list[dict]:
    return [{"preset": VARIANTS["dev"], "res": 512, "warmup": 1, "steps": 3, "samples": 1, "kind": "trainer",
             "name": "dev full 512px: adafactor in backward, every block swapped",
             "config": {**FULL, "run.offload_blocks": "all"}, "est_s": 150}]


def optional_rows() -> list[dict]:
    """Wanted less, run last: [dev]'s text encoder alone (48 GB of weights: no model folder, flux-prep's
    text path on the decoder built in place), the trainer's bf16 [dev] base beside its plain loop."""
    return [{"preset": VARIANTS["dev"], "kind": "encode-text", "name": "dev encode: Mistral 24B text, flux-prep's path",
             "res": 1024, "warmup": 1, "steps": 4, "batch": ENCODE_BATCH, "est_s": 60},
            {**DEV_STEPS, "preset": VARIANTS["dev"], "kind": "trainer", "name": "dev LoRA: bf16 base",
             "config": LORA, "goal": {"img_s_of": "dev LoRA: plain loop, bf16 base"}, "est_s": 70}]


def shrink(row: dict) -> dict:
    """The row at toy size for a CPU: the flux2-tiny preset ([dev]'s rows keep a guidance embedding), a
    64px image, a step or two; the encoders' tiny configs."""
    tiny = {**row, "tiny": True, "preset": "flux2-tiny", "res": 64, "warmup": min(row["warmup"], 1),
            "steps": 2, "est_s": 0}
    if row["preset"] == VARIANTS["dev"]:
        tiny["overrides"] = {"guidance_embeds": True}
    if "batch" in row:
        tiny["batch"] = 2
    return tiny


def offload_count(value, cfg: dict) -> int:
    """run.offload_blocks of a row: a number, or "all" (every double and single block)."""
    return cfg["num_layers"] + cfg["num_single_layers"] if value == "all" else int(value)


# -- the plain loops' inputs --------------------------------------------------------------------------------
def fixed_batch(cfg: dict, res: int, text: int, device) -> dict:
    """One sample's transformer inputs made as Flux2KleinPipeline makes them (its static helpers): the
    patchified latent grid [1, 4C, res/16, res/16] packed into tokens, its 4-axis ids, the padded prompt
    and its ids; a guidance value where the model embeds one ([dev])."""
    from diffusers import Flux2KleinPipeline
    g = torch.Generator(device=device).manual_seed(0)
    side = res // 16
    latents = torch.randn(1, cfg["in_channels"], side, side, device=device, generator=g)
    prompt = torch.randn(1, text, cfg["joint_attention_dim"], device=device, generator=g)
    return {"hidden_states": Flux2KleinPipeline._pack_latents(latents), "encoder_hidden_states": prompt,
            "timestep": torch.rand(1, device=device, generator=g),
            "img_ids": Flux2KleinPipeline._prepare_latent_ids(latents).to(device),
            "txt_ids": Flux2KleinPipeline._prepare_text_ids(prompt).to(device),
            "guidance": torch.full((1,), 4.0, device=device) if cfg["guidance_embeds"] else None,
            "target": torch.randn(1, side * side, cfg["in_channels"], device=device, generator=g)}


# -- encode rows ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def built_in(device, dtype):
    """Modules built directly on `device` in `dtype` (a 4B/24B random init on the host is slow)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            yield
    finally:
        torch.set_default_dtype(before)


def encoder_folder(folder: Path, tiny: bool, device) -> Path:
    """A Flux2KleinPipeline folder without a transformer, written once: the Qwen3-4B text encoder (bf16) and
    the FLUX.2 VAE (fp32, as published) of their real configs with random weights, the scheduler. The
    tokenizer is shared/tiny_flux2.py's byte-level BPE with Qwen3's chat template (the real vocabulary is
    not on the device): prompts are padded to 512 tokens, so the encoder's work is the real one."""
    if (folder / "model_index.json").is_file():
        return folder
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from shared.tiny_flux2 import build_qwen3_tokenizer
    tok = build_qwen3_tokenizer()
    with built_in(device, torch.bfloat16):
        text_encoder = Qwen3ForCausalLM(Qwen3Config(**(QWEN3_TINY if tiny else QWEN3_4B),
                                                    pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id))
    with built_in(device, torch.float32):
        vae = AutoencoderKLFlux2(**(VAE_TINY if tiny else {}))
    pipe = Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), vae=vae,
                              text_encoder=text_encoder, tokenizer=tok, transformer=None)
    partial = folder.with_name(folder.name + ".partial")   # a folder only once whole
    pipe.save_pretrained(partial, safe_serialization=True)
    partial.rename(folder)
    return folder


def pixel_batch(row: dict, device) -> torch.Tensor:
    """uint8 images [B, 3, res, res] on the host (pinned on CUDA, as encode's DataLoader hands them over)."""
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (row["batch"], 3, row["res"], row["res"]), dtype=torch.uint8, generator=g)
    return pixels.pin_memory() if torch.device(device).type == "cuda" else pixels


def captions(n: int) -> list[str]:
    return [CAPTIONS[i % len(CAPTIONS)] for i in range(n)]


def encode_project(row: dict, device, models: Path):
    """flux-prep's Encoders on the folder: a batch's VAE posterior and text columns, copied to the host as
    encode's writer receives them. Returns (step, text step, VAE step)."""
    from preprocess.encode import EncodeOptions, Encoders
    enc = Encoders(str(encoder_folder(models / folder_name(row), row.get("tiny", False), device)), str(device),
                   EncodeOptions(dtype="bfloat16"))
    pixels, texts = pixel_batch(row, device), captions(row["batch"])
    return (lambda: enc.encode_batch(pixels, texts).wait(), lambda: enc.text.encode(texts),
            lambda: enc.encode_pixels(pixels))


def encode_plain(row: dict, device, models: Path):
    """diffusers alone: Flux2KleinPipeline.encode_prompt and vae.encode on the same folder, the pixels moved
    and scaled to [-1, 1] on the device, the results copied to the host. Returns (step, text step, VAE step)."""
    from diffusers import Flux2KleinPipeline
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    folder = encoder_folder(models / folder_name(row), row.get("tiny", False), device)
    pipe = Flux2KleinPipeline.from_pretrained(str(folder), transformer=None, torch_dtype=dtype).to(device)
    pixels, texts = pixel_batch(row, device), captions(row["batch"])

    @torch.inference_mode()
    def text():
        return pipe.encode_prompt(texts, device=device)[0]

    @torch.inference_mode()
    def vae():
        x = pixels.to(device, non_blocking=True).to(dtype) / 127.5 - 1.0
        return pipe.vae.encode(x).latent_dist.mode()

    return (lambda: (vae().cpu(), text().cpu())), text, vae


def encode_text(row: dict, device, models: Path):
    """[dev]'s Mistral text encoder alone, flux-prep's path (shared/family/flux2_text.py: the pipeline's
    prompt embedding run on the decoder stack, and the length from the same tokenization), the decoder
    built in place of its real config (no folder: 48 GB of weights). Returns (step, text step, None)."""
    from transformers import MistralConfig, MistralModel

    from shared.family.flux2_text import MISTRAL3
    from shared.tiny_flux2 import build_mistral_tokenizer
    tok = build_mistral_tokenizer()
    with built_in(device, torch.bfloat16):
        decoder = MistralModel(MistralConfig(**(MISTRAL_TINY if row.get("tiny") else MISTRAL_24B),
                                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                             pad_token_id=tok.pad_token_id))
    decoder.eval().requires_grad_(False)
    texts = captions(row["batch"])

    @torch.inference_mode()
    def step():
        states = MISTRAL3.prompt_embeds(decoder, tok, texts, TEXT, device)
        lengths = MISTRAL3.attention_mask(tok, texts, TEXT).sum(1)
        return states.cpu(), lengths
    return step, step, None


ENCODERS = {"encode-project": encode_project, "encode-plain": encode_plain, "encode-text": encode_text}


def folder_name(row: dict) -> str:
    return "klein-encoders-tiny" if row.get("tiny") else "klein-4b-encoders-random"
