"""Sample images during training (run.sample_every): the cache's sample prompts (encoded once by
`flux-prep encode --sample-prompts`) rendered with the model being trained, by the sampler's own loop
(shared/sampling.py), and decoded by the VAE's decoder alone: no text encoder is loaded here.

Written per step to output_dir/samples/step-N/ (one PNG per prompt and seed, prompt, seed and step in
its text chunks, and grid.png) and, as a grid, to the tracker. With EMA the EMA's weights are
rendered too (samples/step-N/ema/).

How the weights are rendered, so that the last step's samples are flux-sample's images from final/:
full weights run in place (eval mode, the training autocast); a LoRA adapter is merged into a copy of
the base exactly as flux-sample merges final/'s adapter (the copy costs the base's memory while it
renders). Where no bf16 copy of the base is at hand (a quantized or float8 base, blocks in host memory:
`renders_in_place`) a LoRA renders in place, unmerged, from the base it trains on: close to flux-sample's
image from final/, not equal to it. Under FSDP every rank renders its share in place, with the same
number of forwards (each forward gathers the shards), LoRA unmerged. Every rank takes part; only the main
process writes."""
from __future__ import annotations

import contextlib
import copy
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from shared import image_files
from shared.cache.sample_prompts import read_sample_prompts
from shared.latents import VAE_DOWNSAMPLE
from shared.models import ModelLoadError
from shared.family import load_vae
from shared.sampling import decode, denoise, fuse_lora_adapter, guided_batch, initial_noise
from shared.text_batch import PromptEncoding

from .fsdp import trainable_weights, uses_fsdp
from .model import run_conventions


@dataclass
class SamplePlan:
    """What every sampling step renders: (prompt index, seed) jobs and the loop's settings."""
    prompts: list[str]
    cond: list[PromptEncoding]
    empty: PromptEncoding | None
    seeds: list[int]
    size: int
    steps: int
    shift: bool
    guidance: float | None
    cfg_scale: float
    dtype: torch.dtype

    @property
    def jobs(self) -> list[tuple[int, int]]:
        return [(i, s) for i in range(len(self.prompts)) for s in self.seeds]


def plan_samples(cfg, family, reader, guidance_embeds: bool, device: torch.device) -> SamplePlan:
    """The sample settings, by flux-sample's defaults for the model as final/ records it; raises
    ModelLoadError naming a bad run.sample_* value or a cache without sample prompts."""
    run = cfg.run
    seeds = list(run.sample_seeds or [])
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ModelLoadError(f"run.sample_seeds must be a list of integers, got {run.sample_seeds!r}")
    size = run.sample_size or (reader.manifest.get("image") or {}).get("resolution") or 256
    if size <= 0 or size % (2 * VAE_DOWNSAMPLE):
        raise ModelLoadError(f"run.sample_size must be a positive multiple of 16, got {size}")
    conv = run_conventions(cfg, family, guidance_embeds)
    steps = run.sample_steps or conv["default_steps"]
    if steps < 1:
        raise ModelLoadError(f"run.sample_steps must be at least 1, got {steps}")
    guidance, cfg_scale = conv["guidance"], conv["cfg_scale"]
    enc = read_sample_prompts(reader.store, reader.manifest, f"training cache {cfg.data.train_cache}")
    cond = [_on(e, device) for e in enc["cond"]]
    empty = _on(enc["empty"], device) if cfg_scale > 1 else None
    # flux-sample's dtype on this device (bf16 on a GPU, fp32 on the CPU)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return SamplePlan(enc["prompts"], cond, empty, seeds, int(size), int(steps), conv["shift_schedule"],
                      guidance, cfg_scale, dtype)


def _on(e: PromptEncoding, device) -> PromptEncoding:
    return PromptEncoding(e.states.to(device), None if e.pooled is None else e.pooled.to(device))


def load_decoder(cfg, reader, dtype, device):
    """The VAE of run.sample_vae (else model.name) with its encoder dropped, checked to be the VAE
    whose normalisation (FLUX.1: scale and shift) made the cache's latents."""
    source = cfg.run.sample_vae or cfg.model.name
    vae = load_vae(source, dtype, device, reader.family)
    vae.encoder = None
    want = reader.manifest.get("vae") or {}
    have = reader.family.vae_facts(vae)
    if not _same_facts(have, want):
        raise ModelLoadError(f"{source}: its VAE normalises latents by {_short(have)}, the cache's by {_short(want)}: "
                             "set run.sample_vae to the model folder the cache was encoded with")
    return vae


def _same_facts(have: dict, want: dict) -> bool:
    """Equal within 1e-6 (numbers, or lists of them), a fact the cache lacks taken as equal."""
    flat = lambda v: [float(x) for x in (v if isinstance(v, list) else [v])]   # noqa: E731
    return all(len(flat(v)) == len(flat(want.get(k, v)))
               and all(abs(a - b) <= 1e-6 for a, b in zip(flat(v), flat(want.get(k, v)))) for k, v in have.items())


def _short(facts: dict) -> dict:
    return {k: (v if not isinstance(v, list) else f"[{len(v)} values]") for k, v in facts.items()}


class TrainingSamples:
    """The trainer's sample images; off (nothing loaded, nothing done) when run.sample_every is 0."""

    def __init__(self, trainer):
        self.every = trainer.cfg.run.sample_every
        if not self.every:
            return
        self.t = trainer
        unwrapped = trainer.accelerator.unwrap_model(trainer.model)
        self.plan = plan_samples(trainer.cfg, trainer.family, trainer.train_reader,
                                 bool(unwrapped.config.guidance_embeds),
                                 trainer.device)
        self.vae = load_decoder(trainer.cfg, trainer.train_reader, self.plan.dtype, trainer.device)
        self.family = trainer.family
        self.latent_channels = unwrapped.config.in_channels // 4

    def after_step(self, step: int) -> None:
        """Render at every sample_every-th step and at the last one."""
        if self.every and (step % self.every == 0 or step == self.t.max_steps):
            self.render(step)

    def render(self, step: int) -> None:
        t = self.t
        t.settle()
        t.model.eval()
        try:
            self._write(step, "", self._images())
            if t.ema is not None:
                with t.ema.applied():
                    self._write(step, "ema", self._images())
        finally:
            t.model.train()

    def _images(self) -> list:
        """Every job's uint8 image on the main process ([] elsewhere)."""
        t, acc = self.t, self.t.accelerator
        if uses_fsdp(acc) or not t.lora or renders_in_place(t.cfg):   # in place (a LoRA stays unmerged)
            return self._gather(self._render_share(acc.unwrap_model(t.model), acc.process_index, acc.num_processes))
        weights = trainable_weights(acc, t.model)
        model = self._merged_copy(weights) if acc.is_main_process else None
        # the merged copy runs as flux-sample runs it: in the sampling dtype, without autocast
        images = self._render_share(model, 0, 1, autocast=False) if acc.is_main_process else []
        return [img for _, img in sorted(images)]

    def _merged_copy(self, weights: dict):
        """A copy of the base with the adapter merged as flux-sample merges final/'s (written out the
        same way, loaded the same way), in the sampling dtype."""
        from accelerate.utils import extract_model_from_parallel
        from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE

        from .checkpoint import LORA_PREFIX, write_lora_adapter
        unwrapped = self.t.accelerator.unwrap_model(self.t.model)
        # the copy without accelerate's autocast wrapper of forward (deepcopy keeps it, bound to the copy)
        base = extract_model_from_parallel(copy.deepcopy(unwrapped), keep_fp32_wrapper=False)
        base.unload_lora()
        base.to(self.plan.dtype)
        with tempfile.TemporaryDirectory(prefix="lora-sample-", dir=self.t.out) as folder:
            write_lora_adapter(unwrapped, weights, Path(folder))
            fuse_lora_adapter(base, folder, LORA_WEIGHT_NAME_SAFE, prefix=LORA_PREFIX)
        return base.eval()

    def _render_share(self, model, rank: int, world: int, autocast: bool = True) -> list:
        """(job index, image) of this rank's jobs, one job per forward batch; under several ranks each
        runs as many batches as the rank with the most (FSDP gathers the weights in every forward)."""
        p, jobs = self.plan, self.plan.jobs
        mine = list(range(rank, len(jobs), world))
        rounds = -(-len(jobs) // world)
        out = []
        bar = None
        if self.t.cfg.run.progress and self.t.accelerator.is_main_process:
            from tqdm.auto import tqdm
            bar = tqdm(total=rounds * p.steps, desc="samples", unit="step", leave=False, dynamic_ncols=True)
        for k in range(rounds):
            index = mine[k] if k < len(mine) else mine[0] if mine else 0
            i, seed = jobs[index]
            text = guided_batch([p.cond[i]], p.empty)
            noise = initial_noise(self.family, self.latent_channels, [seed], p.size, p.size, self.t.device, p.dtype)
            with self.t.accelerator.autocast() if autocast else contextlib.nullcontext():
                x0 = denoise(self.family, model, noise, text, height_px=p.size, width_px=p.size, steps=p.steps,
                             shift=p.shift, guidance=p.guidance, cfg_scale=p.cfg_scale, progress=bar)
            image = decode(self.family, self.vae, x0, p.size, p.size)[0].numpy()
            if k < len(mine):
                out.append((index, image))
        if bar is not None:
            bar.close()
        return out

    def _gather(self, mine: list) -> list:
        acc = self.t.accelerator
        if acc.num_processes == 1:
            return [img for _, img in sorted(mine)]
        from accelerate.utils import gather_object
        every = gather_object([mine])
        return [img for _, img in sorted(pair for share in every for pair in share)] if acc.is_main_process else []

    def _write(self, step: int, which: str, images: list) -> None:
        """PNGs and grid.png under samples/step-N/[ema/], and the grid to the trackers (main process)."""
        if not self.t.accelerator.is_main_process:
            return
        p = self.plan
        folder = self.t.out / "samples" / f"step-{step}" / which
        meta = {"step": step, "steps": p.steps, "size": p.size, "cfg_scale": p.cfg_scale, "guidance": p.guidance,
                "shift_schedule": p.shift, "ema": bool(which), "software": "flux-prep train"}
        for (i, seed), img in zip(p.jobs, images):
            image_files.save_png(img, folder / image_files.image_name(i, p.prompts[i], seed),
                                 {"prompt": p.prompts[i], "seed": seed, **meta})
        grid = image_files.make_grid(images, len(p.seeds))
        image_files.save_png(grid, folder / image_files.GRID_NAME, meta)
        log_grid(self.t.accelerator, "samples" + (f"/{which}" if which else ""), grid, step)


def renders_in_place(cfg) -> bool:
    """Whether a LoRA's samples render from the training model itself: its base is quantized, float8 or partly
    in host memory, so no bf16 copy to merge the adapter into is at hand (nor room for one, on the cards
    those options are for)."""
    return cfg.model.quantize_base != "none" or cfg.run.precision == "fp8" or cfg.run.offload_blocks > 0


def log_grid(accelerator, tag: str, grid, step: int) -> None:
    """The grid to each tracker that takes images (TensorBoard: one HWC uint8 image)."""
    import numpy as np
    array = np.asarray(grid)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(tag, array, global_step=step, dataformats="HWC")
        elif hasattr(tracker, "log_images"):
            tracker.log_images({tag: [array]}, step=step)
