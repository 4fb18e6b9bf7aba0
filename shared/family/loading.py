"""Loading a model folder's VAE and transformer, each of its family's class (the family read from the folder
where the caller does not say it): shared/models.py finds and checks the parts, the families name their classes."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..models import ModelLoadError, load_part, part_config
from . import family_of_model, family_of_transformer


def load_vae(model: str, dtype=torch.float32, device="cpu", family=None):
    """The VAE of a model folder/hub id, of its family's class (`family`: given, or read from the folder)."""
    family = family or family_of_model(model)
    vae = load_part(family.vae_cls().from_pretrained, model, "vae", family.parts["vae"], torch_dtype=torch.float32,
                    use_safetensors=True)
    for name, child in vae.named_children():
        # FLUX.2's BatchNorm statistics stay float32 (the forward never uses them; the latents' normalisation
        # does, and bf16 would round them): every other part in `dtype`
        if name != "bn":
            child.to(dtype)
    return vae.to(device).eval()


def load_transformer(model: str, dtype=torch.float32, device="cpu", part: str = "transformer"):
    """The transformer of a model folder/hub id; `part=None` reads `model` itself as a transformer folder.
    Its class is its family's, read from its config."""
    config = part_config(model, part) if part else _folder_config(model)
    family = family_of_transformer(config)
    if family is None:
        raise ModelLoadError(f"{model}: the transformer's config names class {config.get('_class_name')!r}, "
                             "not one of flux-prep's families")
    cls = family.transformer_cls()
    if part is None:
        try:
            return cls.from_pretrained(str(model), torch_dtype=dtype, use_safetensors=True).to(device)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"{model}: cannot load the transformer: {str(e).splitlines()[0]}") from e
    return load_part(cls.from_pretrained, model, part, family.parts[part], torch_dtype=dtype,
                     use_safetensors=True).to(device)


def _folder_config(folder: str) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{folder}: not a transformer folder (no config.json)")
    return json.loads(path.read_text())
