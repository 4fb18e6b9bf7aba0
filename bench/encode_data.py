"""bench/encode.py's inputs: a FLUX model folder (tiny, or FLUX.1's real shapes at random) and
JPEG tar shards with CC12M-like captions. Nothing is downloaded."""
from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import torch


def build_model(out: Path, tiny: bool, device: str) -> Path:
    """A folder with vae/, text_encoder(_2)/ and tokenizers: tiny, or FLUX.1's real shapes at random."""
    if (out / "model_done").exists():
        return out
    if tiny:
        from shared.tiny import write_tiny_model
        write_tiny_model(out)
    else:
        from diffusers import AutoencoderKL
        from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

        from shared.tiny import build_clip_tokenizer, build_t5_tokenizer
        clip_tok, t5_tok = build_clip_tokenizer(), build_t5_tokenizer(512)
        clip_tok.save_pretrained(out / "tokenizer")
        t5_tok.save_pretrained(out / "tokenizer_2")
        with torch.device(device):
            t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_ff=10240, num_layers=24, num_heads=64,
                                         d_kv=64, feed_forward_proj="gated-gelu", is_encoder_decoder=False))
            t5.to(torch.bfloat16).save_pretrained(out / "text_encoder_2")
            del t5
            clip = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, num_hidden_layers=12,
                                                num_attention_heads=12, intermediate_size=3072,
                                                max_position_embeddings=77, projection_dim=768,
                                                eos_token_id=clip_tok.eos_token_id,
                                                bos_token_id=clip_tok.bos_token_id, pad_token_id=clip_tok.pad_token_id))
            clip.to(torch.bfloat16).save_pretrained(out / "text_encoder")
            vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                                layers_per_block=2, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159,
                                use_quant_conv=False, use_post_quant_conv=False)
            vae.to(torch.bfloat16).save_pretrained(out / "vae")
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    (out / "model_done").write_text("ok")
    return out


def captions(n: int, lo: int, hi: int, seed: int = 0) -> list[str]:
    """CC12M-like captions of lo..hi tokens: words the benchmark tokenizers keep whole."""
    from shared.tiny import VOCAB_WORDS
    rng = random.Random(seed)
    return [" ".join(rng.choice(VOCAB_WORDS) for _ in range(rng.randint(lo, hi))) for _ in range(n)]


def write_shards(folder: Path, n: int, per_shard: int, sizes, seed: int = 0) -> list[Path]:
    """JPEG tar shards in CC12M's layout, images of photo-like sizes with texture (not flat colour)."""
    import numpy as np
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    caps = captions(n, 15, 35, seed)
    base = rng.integers(0, 255, (1024, 1024, 3), dtype=np.uint8)
    paths = []
    for s in range(0, n, per_shard):
        path = folder / f"bench-{s // per_shard:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(s, min(n, s + per_shard)):
                w, h = sizes[i % len(sizes)]
                y, x = rng.integers(0, 1024 - h), rng.integers(0, 1024 - w)
                buf = io.BytesIO()
                Image.fromarray(base[y:y + h, x:x + w]).save(buf, format="JPEG", quality=90)
                for ext, data in (("jpg", buf.getvalue()), ("txt", caps[i].encode()),
                                  ("json", json.dumps({"caption": caps[i]}).encode())):
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths
