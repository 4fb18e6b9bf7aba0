"""The prompts a training run renders samples of, encoded once with the cache (a side file that the
manifest names): T5 and CLIP encodings made as flux-sample makes them (the library's T5, one prompt
at a time, in the encoder's compute dtype), kept in float32, with the cache's T5 mode and length.

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


def pack(prompts: list[str], encodings: list, empty, *, t5_mode: str, t5_max_length: int) -> bytes:
    """safetensors bytes: t5 [N, L, D] (zero past each prompt's t5_len when trimmed), t5_len [N],
    clip [N, Dc], empty_t5 [L0, D], empty_clip [Dc]; the prompts and T5 settings in the metadata.
    `encodings`, `empty`: PromptEncoding-like (t5 [L, D], clip [Dc])."""
    from safetensors.torch import save
    longest = max(e.t5.shape[0] for e in encodings)
    t5 = torch.zeros(len(encodings), longest, encodings[0].t5.shape[1], dtype=torch.float32)
    for i, e in enumerate(encodings):
        t5[i, :e.t5.shape[0]] = e.t5.float().cpu()
    tensors = {"t5": t5, "t5_len": torch.tensor([e.t5.shape[0] for e in encodings], dtype=torch.int64),
               "clip": torch.stack([e.clip.float().cpu() for e in encodings]),
               "empty_t5": empty.t5.float().cpu().contiguous(), "empty_clip": empty.clip.float().cpu().contiguous()}
    meta = {"format": FORMAT, "prompts": json.dumps(prompts), "t5_mode": t5_mode, "t5_max_length": str(t5_max_length)}
    return save(tensors, metadata=meta)


def write_sample_prompts(cache, data: bytes, storage_options: dict | None = None) -> None:
    """Write the side file, then name it in the manifest (each write atomic; the manifest last)."""
    store = open_store(cache, storage_options)
    manifest = json.loads(store.read_bytes(MANIFEST_NAME))
    store.write_bytes(SAMPLE_PROMPTS_NAME, data)
    manifest["sample_prompts"] = SAMPLE_PROMPTS_NAME
    store.write_json(MANIFEST_NAME, manifest)


def read_sample_prompts(store, manifest: dict, where: str) -> dict:
    """{"prompts": [...], "t5": [[L_i, D] per prompt], "clip": [[Dc] per prompt], "empty_t5", "empty_clip"},
    refusing a side file whose T5 mode or length is not the cache's (the cache was encoded again since)."""
    from safetensors.torch import load
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
    t5 = manifest["t5"]
    if meta.get("format") != FORMAT or meta.get("t5_mode") != t5["mode"] \
            or int(meta.get("t5_max_length", -1)) != int(t5["max_length"]):
        raise CacheError(f"{where}: {name} was encoded with T5 {meta.get('t5_mode')}/{meta.get('t5_max_length')}, "
                         f"the cache with {t5['mode']}/{t5['max_length']}: encode the sample prompts again")
    lengths = tensors["t5_len"].tolist()
    return {"prompts": json.loads(meta["prompts"]), "t5": [tensors["t5"][i, :n] for i, n in enumerate(lengths)],
            "clip": list(tensors["clip"]), "empty_t5": tensors["empty_t5"], "empty_clip": tensors["empty_clip"]}


def _metadata(data: bytes) -> dict:
    """The safetensors header's __metadata__ (the format: 8-byte length, then JSON)."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]).get("__metadata__", {}) or {}
