"""The prompts a training run renders samples of, encoded once with the cache (a side file that the
manifest names): the family's text encodings made as flux-sample makes them (the library's encoders, one
prompt at a time, in the encoder's compute dtype), kept in float32, with the cache's text mode and length.
Tensors and metadata are named by the cache's text columns (FLUX.1: t5, t5_len, clip, empty_t5, empty_clip).

The empty prompt is stored beside them, encoded the same way, for classifier-free guidance: the
cache's own `empty_prompt.safetensors` is in the storage dtype and made by the batched encoder."""
from __future__ import annotations

import json

import torch

from .manifest import CacheError
from .schema import MANIFEST_NAME
from .store import open_store

SAMPLE_PROMPTS_NAME = "sample_prompts.safetensors"
FORMAT = "flux-prep sample prompts 1"


def pack(prompts: list[str], encodings: list, empty, *, text, mode: str, max_length: int) -> bytes:
    """safetensors bytes: states [N, L, D] (zero past each prompt's length when trimmed), lengths [N], pooled
    [N, Dp] where the family has one, and the empty prompt's; the prompts and text settings in the metadata.
    `encodings`, `empty`: PromptEncoding; `text`: the family's TextSpec."""
    from safetensors.torch import save

    from ..safetensors_order import canonical
    from ..text_batch import pad_and_mask
    states, _ = pad_and_mask([e.states.float().cpu() for e in encodings])
    tensors = {text.states: states,
               text.length: torch.tensor([e.states.shape[0] for e in encodings], dtype=torch.int64)}
    if text.pooled:
        tensors[text.pooled] = torch.stack([e.pooled.float().cpu() for e in encodings])
    tensors[f"empty_{text.states}"] = empty.states.float().cpu().contiguous()
    if text.pooled:
        tensors[f"empty_{text.pooled}"] = empty.pooled.float().cpu().contiguous()
    meta = {"format": FORMAT, "prompts": json.dumps(prompts), f"{text.states}_mode": mode,
            f"{text.states}_max_length": str(max_length)}
    return canonical(save(tensors, metadata=meta))   # metadata keys in one order: the same bytes every run


def write_sample_prompts(cache, data: bytes, storage_options: dict | None = None) -> None:
    """Write the side file, then name it in the manifest (each write atomic; the manifest last)."""
    store = open_store(cache, storage_options)
    manifest = json.loads(store.read_bytes(MANIFEST_NAME))
    store.write_bytes(SAMPLE_PROMPTS_NAME, data)
    manifest["sample_prompts"] = SAMPLE_PROMPTS_NAME
    store.write_json(MANIFEST_NAME, manifest)


def read_sample_prompts(store, manifest: dict, where: str) -> dict:
    """{"prompts": [...], "cond": [PromptEncoding per prompt], "empty": PromptEncoding}, refusing a side file
    whose text mode or length is not the cache's (the cache was encoded again since)."""
    from safetensors.torch import load

    from ..family import family_of_manifest
    from ..text_batch import PromptEncoding
    name = manifest.get("sample_prompts")
    if not name:
        raise CacheError(f"{where}: no sample prompts; encode them with flux-prep encode --sample-prompts FILE "
                         "--output CACHE --model MODEL")
    try:
        data = store.read_bytes(name)
    except FileNotFoundError:
        raise CacheError(f"{where}: the manifest names {name}, which is missing") from None
    tensors = load(data)
    meta = _metadata(data)
    spec = family_of_manifest(manifest).text
    settings, col = spec.settings(manifest), spec.states
    if meta.get("format") != FORMAT or meta.get(f"{col}_mode") != settings["mode"] \
            or int(meta.get(f"{col}_max_length", -1)) != int(settings["max_length"]):
        raise CacheError(f"{where}: {name} was encoded with {spec.label} {meta.get(f'{col}_mode')}/"
                         f"{meta.get(f'{col}_max_length')}, the cache with {settings['mode']}/"
                         f"{settings['max_length']}: encode the sample prompts again")
    lengths = tensors[spec.length].tolist()
    pooled = list(tensors[spec.pooled]) if spec.pooled else [None] * len(lengths)
    cond = [PromptEncoding(tensors[col][i, :n], p) for i, (n, p) in enumerate(zip(lengths, pooled))]
    empty = PromptEncoding(tensors[f"empty_{col}"], tensors[f"empty_{spec.pooled}"] if spec.pooled else None)
    return {"prompts": json.loads(meta["prompts"]), "cond": cond, "empty": empty}


def _metadata(data: bytes) -> dict:
    """The safetensors header's __metadata__ (the format: 8-byte length, then JSON)."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]).get("__metadata__", {}) or {}
