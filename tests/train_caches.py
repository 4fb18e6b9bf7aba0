"""Small caches for the trainer's tests, written with the real CacheWriter.

Samples are synthetic but learnable: each of a few classes has its own latent pattern and its own
T5/CLIP encodings, so a tiny model can lower its loss on them within seconds."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save

from shared.cache import CacheWriter, cache_manifest, write_manifest
from shared.family.flux1 import FLUX1
from shared.cache.store import is_remote, open_store

T5_DIM, CLIP_DIM, CHANNELS, MAX_LEN = 64, 64, 16, 32


def write_cache(out_dir, n: int, *, t5_mode: str = "trimmed", sizes=((8, 8),), rows_per_shard: int = 16,
                row_group_rows: int = 4, seed: int = 0, prefix: str = "train", classes: int = 4,
                dtype: str = "float32", logvar: bool = False, references: int = 0, ref_sizes=((8, 8),),
                family=FLUX1) -> Path:
    """`logvar`: also store a posterior log-variance per sample (as encode --store-logvar). `out_dir`
    may be a URL (s3://...): the cache is written there, and the URL returned. `references`: each sample
    also holds that many reference latents (shared/cache/references.py), sample i's of size
    ref_sizes[i % len]: its class pattern's negative, so the edit is learnable."""
    out_dir = out_dir if is_remote(out_dir) else Path(out_dir)
    g = torch.Generator().manual_seed(seed)
    proto = torch.Generator().manual_seed(1234)   # class prototypes shared by train and val caches
    patterns = {s: torch.randn(classes, CHANNELS, *s, generator=proto) for s in sizes}
    text = torch.randn(classes, MAX_LEN, T5_DIM, generator=proto)
    clip = torch.randn(classes, CLIP_DIM, generator=proto)
    dtypes = {"latent": dtype, "t5": dtype, "clip": dtype, **({"latent_logvar": dtype} if logvar else {})}
    ref_patterns = {s: -torch.randn(classes, CHANNELS, *s, generator=torch.Generator().manual_seed(99))
                    for s in ref_sizes}
    with CacheWriter(out_dir, prefix, dtypes, text=family.text, rows_per_shard=rows_per_shard,
                     row_group_rows=row_group_rows, references=references) as w:
        for i in range(n):
            c = int(torch.randint(classes, (1,), generator=g))
            size = sizes[i % len(sizes)]
            length = MAX_LEN if t5_mode == "padded" else 3 + int(torch.randint(MAX_LEN - 3, (1,), generator=g))
            latent = patterns[size][c] + 0.1 * torch.randn(CHANNELS, *size, generator=g)
            lv = -3.0 + 0.5 * torch.randn(CHANNELS, *size, generator=g) if logvar else None
            rs = ref_sizes[i % len(ref_sizes)]
            refs = [{"latent": ref_patterns[rs][c] + 0.1 * torch.randn(CHANNELS, *rs, generator=g),
                     "width": rs[1] * 8, "height": rs[0] * 8} for _ in range(references)]
            w.add(key=f"{prefix}-{i:05d}", caption=f"class {c}", latent=latent, t5=text[c, :length], t5_len=length,
                  clip=clip[c], width=size[1] * 8, height=size[0] * 8, latent_logvar=lv, refs=refs or None)
        shards = w.close()
    return finish_cache(out_dir, shards, dtypes, t5_mode, family,
                        **({"references": references} if references else {}))


def finish_cache(out_dir, shards, dtypes: dict, t5_mode: str, family=None, **manifest) -> Path:
    """A synthetic FLUX.1 cache's empty prompt and manifest (`manifest`: its extra sections), after its shards."""
    open_store(out_dir).write_bytes("empty_prompt.safetensors", save({
        "t5": torch.zeros(MAX_LEN if t5_mode == "padded" else 1, T5_DIM), "clip": torch.zeros(CLIP_DIM),
        "t5_len": torch.tensor(1)}))
    write_manifest(out_dir, cache_manifest(
        family=family or FLUX1, dtypes=dtypes, dims={"latent_channels": CHANNELS, "t5_dim": T5_DIM,
                                                     "clip_dim": CLIP_DIM},
        text={"mode": t5_mode, "max_length": MAX_LEN}, shards=shards,
        vae={"scaling_factor": 0.3611, "shift_factor": 0.1159},
        image={"resolution": 64, "buckets": None, "crop": "center", "min_size": 0}, **manifest))
    return out_dir


def set_manifest(cache_dir, **changes) -> None:
    path = Path(cache_dir) / "manifest.json"
    m = json.loads(path.read_text())
    m.update(changes)
    path.write_text(json.dumps(m))


def tiny_config(tmp_path, train_cache, val_cache=None, **overrides):
    """A TrainConfig for the tiny preset on the CPU; overrides as {'section.key': value}. The preset has
    no published weights: its init is random, a LoRA's base included (lora.allow_random_base), unless a
    test loads a model folder with model.init pretrained."""
    from train.config import load_config
    base = {
        "data.train_cache": str(train_cache), "data.val_cache": str(val_cache) if val_cache else None,
        "data.batch_size": 4, "data.num_workers": 0, "data.shuffle_buffer": 8,
        "model.name": "tiny", "model.init": "random", "lora.allow_random_base": True,
        "run.output_dir": str(tmp_path / "run"), "run.max_steps": 4,
        "run.precision": "no", "run.log_every": 1, "run.tensorboard": False, "run.progress": False,
        "optim.lr": 1e-3, "flow.guidance_dropout": 0.0,
    }
    base.update(overrides)
    return load_config(None, base)


def read_metrics(run_dir) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln]


def first_step_replayed(trainer) -> dict:
    """Train `trainer` to the end, then replay its first step by hand: the first batch's loss under the
    initial weights, from the trainer's own generator state (worker 0's) and step settings. Returns the batches
    consumed, the loss step 1 logged, the replayed one, the initial model and generator state."""
    import copy

    from train.step import EmptyPrompt, training_loss
    initial = copy.deepcopy(trainer.accelerator.unwrap_model(trainer.model))
    state = trainer.generators[0].get_state()   # the first batch comes from data slot (worker) 0
    generator = torch.Generator().set_state(state)
    batches: list = []
    trainer.train(on_batch=batches.append)
    empty = (EmptyPrompt(trainer.train_reader.empty_prompt(), trainer.family.text, "cpu")
             if trainer.empty is not None else None)
    with torch.no_grad():
        replayed = training_loss(initial, batches[0], trainer.settings, generator, empty).item()
    logged = next(m["loss"] for m in read_metrics(trainer.out) if m.get("step") == 1 and "loss" in m)
    return {"batches": batches, "logged": logged, "replayed": replayed, "initial": initial, "generator_state": state}
