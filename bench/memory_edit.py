"""Edit training's rows of bench/memory.py (--suite edit, issue 27): a LoRA (rank 16) trained with reference
images, whose tokens follow the noisy ones, so that the sequence grows by each reference's tokens.

- FLUX.1 Kontext [dev] (the `flux-kontext-dev` preset: [dev]'s transformer, family flux1-kontext) at 1024px
  with one 1024px reference: 4096 + 4096 image tokens + 512 text. The plain loop's inputs are made as
  FluxKontextPipeline makes them (its _pack_latents and _prepare_latent_image_ids, the reference's ids with
  axis 0 = 1, the ids concatenated along the sequence, the prediction sliced back to the noisy tokens); the
  trainer's rows read a synthetic Kontext cache with one reference per row (bench/train_data.py).
  Goals: <= 20 GiB with an 8-bit base; the bf16 base at least as fast as the plain loop.
- FLUX.2 [klein] 4B at 1024px with two 1024px references (3 x 4096 image tokens + 512 text), the plain
  loop's references made as Flux2KleinPipeline.prepare_image_latents makes them (_pack_latents,
  _prepare_image_ids: t = 10, 20). Goal: <= 8 GiB with an 8-bit base (int8 and float8; int8 also with
  run.offload_activations).

Each row's `refs`: its reference images, each at the row's resolution. With --tiny every row runs at toy size
(tiny-kontext / flux2-tiny), which is how tests/test_bench_lora_speed.py and test_bench_flux2.py run them.
"""
from __future__ import annotations

import torch

import memory_flux2

LORA = {"lora.rank": 16, "run.precision": "bf16", "optim.lr": 1e-4}
STEPS = {"res": 1024, "warmup": 2, "steps": 8}
KONTEXT = {**STEPS, "family": "flux1-kontext", "preset": "flux-kontext-dev", "refs": 1}
KLEIN = {**STEPS, "family": "flux2", "preset": memory_flux2.VARIANTS["klein-4B"], "refs": 2}
KONTEXT_PLAIN = "Kontext LoRA: plain loop, bf16 base"
KLEIN_PLAIN = "klein-4B edit LoRA: plain loop, bf16 base"


def rows(family: str, tiny: bool) -> list[dict]:
    """The edit suite of a family (flux1: Kontext; flux2: [klein] 4B), in the order they run."""
    if family == "flux2":
        out = klein_rows()
        return [memory_flux2.shrink(r) for r in out] if tiny else out
    out = kontext_rows()
    return [shrink_kontext(r) for r in out] if tiny else out


def kontext_rows() -> list[dict]:
    def trainer(name, config, **more):
        return {**KONTEXT, "kind": "trainer", "name": f"Kontext LoRA: {name}", "config": {**LORA, **config}, **more}
    return [{**KONTEXT, "kind": "plain-lora", "name": KONTEXT_PLAIN, "est_s": 75},
            trainer("bf16 base", {}, goal={"img_s_of": KONTEXT_PLAIN}, est_s=75),
            trainer("float8 base", {"model.quantize_base": "float8"}, goal={"peak_gib": 20}, est_s=75),
            trainer("nf4 base", {"model.quantize_base": "nf4"}, est_s=100),
            # the blocks' 22 GiB of bf16 weights in pinned host memory, each moved in before it runs
            trainer("bf16 base, all 57 blocks swapped", {"run.offload_blocks": "all"},
                    same_as="Kontext LoRA: bf16 base", est_s=120)]


def klein_rows() -> list[dict]:
    def trainer(name, config, **more):
        return {**KLEIN, "kind": "trainer", "name": f"klein-4B edit LoRA: {name}", "config": {**LORA, **config},
                **more}
    return [{**KLEIN, "kind": "plain-lora", "name": KLEIN_PLAIN, "est_s": 45},
            trainer("bf16 base", {}, goal={"img_s_of": KLEIN_PLAIN}, est_s=50),
            *[trainer(f"{q} base", {"model.quantize_base": q}, goal={"peak_gib": 8}, est_s=55)
              for q in ("int8", "float8")],
            # each block's saved input in host memory (run.offload_activations): 12800 tokens' worth a block
            trainer("int8 base, activations offloaded", {"model.quantize_base": "int8", **memory_flux2.OFFLOAD_ACTS},
                    goal={"peak_gib": 8}, est_s=60)]


def shrink_kontext(row: dict) -> dict:
    """A Kontext row at toy size for a CPU: the tiny transformer with Kontext's guidance embedding."""
    return {**row, "tiny": True, "preset": "tiny-kontext", "res": 64, "text": 32, "warmup": 1, "steps": 2,
            "est_s": 0}


# -- the plain loops' inputs ----------------------------------------------------------------------------------
def fixed_batch(cfg: dict, row: dict, text: int, device) -> dict:
    """One sample's transformer inputs with the row's references after the noisy tokens; `target` covers the
    noisy tokens only (the plain loop slices the prediction back to it)."""
    if row["family"] == "flux2":
        return klein_batch(cfg, row["res"], text, row["refs"], device)
    return kontext_batch(cfg, row["res"], text, row["refs"], device)


def kontext_batch(cfg: dict, res: int, text: int, refs: int, device) -> dict:
    """As FluxKontextPipeline.prepare_latents and its denoising loop make them: latents [1, 16, res/8, res/8]
    packed 2x2, each reference's latents packed the same way with ids whose axis 0 is 1, tokens and ids
    concatenated along the sequence; text ids zero (encode_prompt's)."""
    from diffusers import FluxKontextPipeline
    g = torch.Generator(device=device).manual_seed(0)
    channels, hw = cfg["in_channels"] // 4, res // 8

    def packed():
        latents = torch.randn(1, channels, hw, hw, device=device, generator=g)
        return FluxKontextPipeline._pack_latents(latents, 1, channels, hw, hw)

    def ids(axis0: int):
        out = FluxKontextPipeline._prepare_latent_image_ids(1, hw // 2, hw // 2, device, torch.float32)
        out[..., 0] = axis0
        return out
    noisy = packed()
    tokens = torch.cat([noisy] + [packed() for _ in range(refs)], dim=1)
    return {"hidden_states": tokens,
            "encoder_hidden_states": torch.randn(1, text, cfg["joint_attention_dim"], device=device, generator=g),
            "pooled_projections": torch.randn(1, cfg["pooled_projection_dim"], device=device, generator=g),
            "timestep": torch.rand(1, device=device, generator=g),
            "guidance": torch.full((1,), 2.5, device=device) if cfg["guidance_embeds"] else None,
            "img_ids": torch.cat([ids(0)] + [ids(1) for _ in range(refs)], dim=0),
            "txt_ids": torch.zeros(text, 3, device=device),
            "target": torch.randn(noisy.shape, device=device, generator=g)}


def klein_batch(cfg: dict, res: int, text: int, refs: int, device) -> dict:
    """memory_flux2.fixed_batch's inputs with the references appended as Flux2KleinPipeline appends its
    image_latents: each patchified latent packed, the tokens concatenated, ids from _prepare_image_ids."""
    from diffusers import Flux2KleinPipeline
    batch = memory_flux2.fixed_batch(cfg, res, text, device)
    g = torch.Generator(device=device).manual_seed(1)
    side = res // 16
    latents = [torch.randn(1, cfg["in_channels"], side, side, device=device, generator=g) for _ in range(refs)]
    ref_tokens = torch.cat([Flux2KleinPipeline._pack_latents(x) for x in latents], dim=1)
    ref_ids = Flux2KleinPipeline._prepare_image_ids(latents).to(device)
    return {**batch, "hidden_states": torch.cat([batch["hidden_states"], ref_tokens], dim=1),
            "img_ids": torch.cat([batch["img_ids"], ref_ids], dim=1)}
