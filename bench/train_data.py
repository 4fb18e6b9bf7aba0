"""Synthetic caches for the trainer's benchmarks: random tensors with the shapes of the real thing."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch


def write_cache(root: Path, name: str, mode: str, length, n: int, latent_hw: int, dims: dict, family=None,
                references: int = 0) -> tuple[Path, list]:
    """A synthetic cache (random tensors, bf16) with the shapes of the real thing; reused when present.
    `family`: FLUX.1's (default) or Kontext's; `references`: reference images per row, each a latent of the
    target's size (edit training)."""
    from shared.cache import CacheWriter, cache_manifest, write_manifest
    from shared.family.flux1 import FLUX1
    family = family or FLUX1
    from safetensors.torch import save_file
    out = root / name
    lengths_file = out / "lengths.json"
    if (out / "manifest.json").is_file() and lengths_file.is_file():
        return out, json.loads(lengths_file.read_text())
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    max_length = length if mode == "padded" else length[1]
    lengths = []
    dtypes = {"latent": "bfloat16", "t5": "bfloat16", "clip": "bfloat16"}
    with CacheWriter(out, "bench", dtypes, text=family.text, rows_per_shard=256, row_group_rows=32,
                     references=references) as w:
        for i in range(n):
            real = length if mode == "padded" else int(torch.randint(length[0], length[1] + 1, (1,), generator=g))
            lengths.append(real)
            w.add(key=f"bench-{i:06d}", caption="synthetic",
                  latent=torch.randn(16, latent_hw, latent_hw, generator=g),
                  t5=torch.randn(real, dims["t5"], generator=g), t5_len=real,
                  clip=torch.randn(dims["clip"], generator=g), width=latent_hw * 8, height=latent_hw * 8,
                  refs=random_refs(references, 16, latent_hw, g))
        shards = w.close()
    save_file({"t5": torch.zeros(max_length if mode == "padded" else 1, dims["t5"]),
               "clip": torch.zeros(dims["clip"]), "t5_len": torch.tensor(1)}, str(out / "empty_prompt.safetensors"))
    write_manifest(out, cache_manifest(family=family, dtypes=dtypes, dims={"latent_channels": 16, "t5_dim": dims["t5"],
                                                            "clip_dim": dims["clip"]},
                                       text={"mode": mode, "max_length": max_length}, shards=shards,
                                       vae={"scaling_factor": 0.3611, "shift_factor": 0.1159},
                                       **reference_fact(references)))
    lengths_file.write_text(json.dumps(lengths))
    return out, lengths


def write_flux2_cache(root: Path, name: str, n: int, latent_hw: int, channels: int, text_dim: int,
                      length: int = 512, references: int = 0) -> Path:
    """A synthetic FLUX.2 cache (random bf16 tensors) of the real shapes: latents [channels, hw, hw],
    padded text [length, text_dim] + text_len, no pooled vector, the VAE's BatchNorm statistics over the
    2x2-patchified channels (non-trivial, so the normalisation is exercised), `references` reference latents
    of the target's size per row; reused when present."""
    from safetensors.torch import save_file

    from shared.cache import CacheWriter, cache_manifest, write_manifest
    from shared.family.flux2 import FLUX2
    out = root / name
    if (out / "manifest.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    dtypes = {"latent": "bfloat16", "text": "bfloat16"}
    with CacheWriter(out, "bench", dtypes, text=FLUX2.text, rows_per_shard=256, row_group_rows=32,
                     references=references) as w:
        for i in range(n):
            real = int(torch.randint(8, length // 2, (1,), generator=g))   # a caption's tokens; the rest padding
            w.add(key=f"bench-{i:06d}", caption="synthetic", latent=torch.randn(channels, latent_hw, latent_hw,
                                                                                generator=g),
                  text=torch.randn(length, text_dim, generator=g), text_len=real,
                  width=latent_hw * 8, height=latent_hw * 8, refs=random_refs(references, channels, latent_hw, g))
        shards = w.close()
    save_file({"text": torch.zeros(length, text_dim), "text_len": torch.tensor(1)},
              str(out / "empty_prompt.safetensors"))
    bn = 4 * channels
    vae = {"bn_mean": (0.1 * torch.randn(bn, generator=g)).tolist(),
           "bn_var": (0.5 + torch.rand(bn, generator=g)).tolist(), "batch_norm_eps": 1e-4}
    manifest = cache_manifest(family=FLUX2, dtypes=dtypes, dims={"latent_channels": channels, "text_dim": text_dim},
                              text={"mode": "padded", "max_length": length}, shards=shards, vae=vae,
                              **reference_fact(references))
    manifest.setdefault("family", FLUX2.name)   # written by cache_manifest itself once families are recorded
    write_manifest(out, manifest)
    return out


def random_refs(count: int, channels: int, latent_hw: int, g) -> list[dict] | None:
    """A row's reference images for CacheWriter.add (None for a plain cache): random latents of one size."""
    if not count:
        return None
    return [{"latent": torch.randn(channels, latent_hw, latent_hw, generator=g), "width": latent_hw * 8,
             "height": latent_hw * 8} for _ in range(count)]


def reference_fact(count: int) -> dict:
    """The manifest's reference count, written as encode writes it: only for a cache with references."""
    from shared.cache.references import REFERENCES_KEY
    return {REFERENCES_KEY: count} if count else {}


def s3_server():
    """moto's S3 server on 127.0.0.1 (tests/s3_server.py, the one the tests start), its credentials and
    endpoint in this process's environment, where the trainer's readers find them."""
    import os
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from s3_server import S3Server
    server = S3Server()
    os.environ.update(server.env())
    return server


def upload(local: Path, server, name: str) -> str:
    """A local cache copied into the bucket `bench` of an S3 server (tests/s3_server.py); its s3:// URL."""
    import s3fs
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **server.options())
    if not fs.exists("bench"):
        fs.mkdir("bench")
    t0 = time.perf_counter()
    fs.put(str(local), f"bench/{name}", recursive=True)
    print(f"uploaded {name} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return f"s3://bench/{name}"
