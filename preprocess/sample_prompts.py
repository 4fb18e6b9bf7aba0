"""`flux-prep encode --sample-prompts FILE`: the prompts a training run renders samples of, encoded into
an existing cache (after the images, or alone), with the cache's text mode and length.

They are encoded exactly as flux-sample encodes prompts (the family's text encoder with the library's
forward, one prompt at a time; bf16 on a GPU, fp32 on the CPU, flux-sample's own defaults), so that a
sample the trainer renders equals flux-sample's image for the same weights and seed."""
from __future__ import annotations

from pathlib import Path

import torch

from shared.cache import CacheError, read_manifest
from shared.cache.sample_prompts import pack, write_sample_prompts
from shared.devices import resolve_device
from shared.family import family_of_manifest, family_of_model


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


def check_text_settings(manifest: dict, mode: str | None, max_length: int | None, where: str) -> None:
    """Refuse text settings asked for on the command line that are not the cache's."""
    spec = family_of_manifest(manifest).text
    text = spec.settings(manifest)
    if mode is not None and mode != text["mode"]:
        raise CacheError(f"{where}: the cache's {spec.label} mode is {text['mode']!r}, not {mode!r}; sample prompts "
                         "are encoded as the cache was (leave --text-mode out)")
    if max_length and int(max_length) != int(text["max_length"]):
        raise CacheError(f"{where}: the cache's {spec.label} length is {text['max_length']}, not {max_length}; "
                         "sample prompts are encoded as the cache was (leave --text-max-length out)")


def encode_sample_prompts(model: str, cache: str, prompts_file: Path, *, text_mode: str | None = None,
                          text_max_length: int | None = None, device: str | None = None,
                          storage_options: dict | None = None) -> int:
    """Encode the file's prompts (and the empty prompt) into `cache`; returns how many prompts."""
    prompts = read_prompt_file(prompts_file)
    manifest = read_manifest(cache, storage_options)
    check_text_settings(manifest, text_mode, text_max_length, str(cache))
    family = family_of_manifest(manifest)
    if family_of_model(model) is not family:
        raise CacheError(f"{cache}: a {family.name} cache; {model} is a {family_of_model(model).name} model")
    dev = resolve_device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    spec = family.text
    text = spec.settings(manifest)
    encoder = family.load_text_encoder(model, dev, dtype, mode=text["mode"], max_length=int(text["max_length"]),
                                       options=family.sampling_text_options)
    enc = encoder.prompt_encodings(prompts + [""], batch_size=1)
    have = {spec.states: enc[0].states.shape[-1], **({spec.pooled: enc[0].pooled.shape[-1]} if spec.pooled else {})}
    want = {c: manifest["dims"][k] for c, k in spec.dim_keys().items()}
    if have != want:
        raise CacheError(f"{cache}: {model}'s text encoders give states of widths {have}, the cache holds {want}")
    write_sample_prompts(cache, pack(prompts, enc[:-1], enc[-1], text=spec, mode=text["mode"],
                                     max_length=int(text["max_length"])), storage_options)
    return len(prompts)
