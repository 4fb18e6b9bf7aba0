"""`flux-prep encode --sample-prompts FILE`: the prompts a training run renders samples of, encoded into
an existing cache (after the images, or alone), with the cache's T5 mode and length.

They are encoded exactly as flux-sample encodes prompts (shared/sampling.py encode_all, the library's T5,
one prompt at a time; bf16 on a GPU, fp32 on the CPU, flux-sample's own defaults), so that a sample the
trainer renders equals flux-sample's image for the same weights and seed."""
from __future__ import annotations

from pathlib import Path

import torch

from shared.cache import CacheError, read_manifest
from shared.cache.sample_prompts import pack, write_sample_prompts
from shared.devices import resolve_device
from shared.models import load_clip, load_t5
from shared.sampling import PromptEncoding, encode_all


def read_prompt_file(path: Path) -> list[str]:
    """One prompt a line (blank lines skipped); refuses a missing, non-UTF-8 or empty file."""
    if not path.is_file():
        raise ValueError(f"{path}: no such sample prompts file")
    try:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    if not prompts:
        raise ValueError(f"{path}: no prompts (the file is empty)")
    return prompts


def check_t5_settings(manifest: dict, t5_mode: str | None, t5_max_length: int | None, where: str) -> None:
    """Refuse T5 settings asked for on the command line that are not the cache's."""
    t5 = manifest["t5"]
    if t5_mode is not None and t5_mode != t5["mode"]:
        raise CacheError(f"{where}: the cache's T5 mode is {t5['mode']!r}, not {t5_mode!r}; sample prompts are "
                         "encoded as the cache was (leave --t5-mode out)")
    if t5_max_length and int(t5_max_length) != int(t5["max_length"]):
        raise CacheError(f"{where}: the cache's T5 length is {t5['max_length']}, not {t5_max_length}; sample "
                         "prompts are encoded as the cache was (leave --t5-max-length out)")


def encode_sample_prompts(model: str, cache: str, prompts_file: Path, *, t5_mode: str | None = None,
                          t5_max_length: int | None = None, device: str | None = None,
                          storage_options: dict | None = None) -> int:
    """Encode the file's prompts (and the empty prompt) into `cache`; returns how many prompts."""
    prompts = read_prompt_file(prompts_file)
    manifest = read_manifest(cache, storage_options)
    check_t5_settings(manifest, t5_mode, t5_max_length, str(cache))
    dev = resolve_device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    mode, length = manifest["t5"]["mode"], int(manifest["t5"]["max_length"])
    t5_tok, t5 = load_t5(model, dtype, dev)
    clip_tok, clip = load_clip(model, dtype, dev)
    enc = encode_all(prompts + [""], t5_tok, t5, clip_tok, clip, t5_mode=mode, t5_max_length=length,
                     batch_size=1)
    dims = manifest["dims"]
    if enc[0].t5.shape[-1] != dims["t5_dim"] or enc[0].clip.shape[-1] != dims["clip_dim"]:
        raise CacheError(f"{cache}: {model}'s text encoders give T5 {enc[0].t5.shape[-1]} / CLIP "
                         f"{enc[0].clip.shape[-1]} wide states, the cache holds {dims['t5_dim']} / {dims['clip_dim']}")
    empty: PromptEncoding = enc[-1]
    write_sample_prompts(cache, pack(prompts, enc[:-1], empty, t5_mode=mode, t5_max_length=length), storage_options)
    return len(prompts)
