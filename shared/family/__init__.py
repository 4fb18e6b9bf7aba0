"""The model families flux-prep knows, and how each is recognised: a model folder by its
`model_index.json` (`_class_name`, as diffusers picks a pipeline), a transformer by its config's
`_class_name`, a cache by its manifest's `family`, a trained model by its flux_prep.json."""
from __future__ import annotations

import json
from pathlib import Path

from .base import TEXT_MODES, Family, TextSpec
from .flux1 import FLUX1
from .flux1_kontext import FLUX1_KONTEXT
from .flux2 import FLUX2

FAMILIES: dict[str, Family] = {f.name: f for f in (FLUX1, FLUX1_KONTEXT, FLUX2)}
# Caches and trained models written before families had names are FLUX.1's.
DEFAULT_FAMILY = "flux1"

__all__ = ["FAMILIES", "TEXT_MODES", "Family", "TextSpec", "family_of_manifest", "family_of_model",
           "family_of_pipeline", "family_of_transformer", "get_family", "load_transformer", "load_vae"]


def get_family(name: str | None) -> Family:
    try:
        return FAMILIES[name or DEFAULT_FAMILY]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}") from None


def family_of_pipeline(class_name: str) -> Family | None:
    """The family of a diffusers pipeline class name (model_index.json's `_class_name`), None if unknown."""
    return next((f for f in FAMILIES.values() if class_name in f.pipelines), None)


def family_of_transformer(config: dict) -> Family | None:
    """The family of a transformer config (its `_class_name`), None where it names none we know."""
    name = config.get("_class_name") or ""
    # A model saved from under FSDP2 names its wrapper class (FSDPFluxTransformer2DModel)
    name = name.removeprefix("FSDP")
    return next((f for f in FAMILIES.values() if f.transformer_class == name), None)


def family_of_manifest(manifest: dict) -> Family:
    return get_family(manifest.get("family"))


def family_of_model(model: str) -> Family:
    """The family of a model folder or hub id, from its model_index.json as diffusers reads it (a folder
    without one, e.g. a bare transformer folder, by its transformer config)."""
    from ..models import ModelLoadError, model_index, part_config
    index = model_index(model)
    if index is not None:
        fam = family_of_pipeline(index.get("_class_name", ""))
        if fam is None:
            raise ModelLoadError(f"{model}: model_index.json names pipeline {index.get('_class_name')!r}, not one "
                                 f"of flux-prep's families ({_pipelines()})")
        return fam
    own = Path(model) / "config.json"   # a transformer folder itself (a trainer's final/)
    config = json.loads(own.read_text()) if own.is_file() else part_config(model, "transformer", required=False)
    fam = family_of_transformer(config or {})
    if fam is None:
        raise ModelLoadError(f"{model}: no model_index.json and no transformer config naming a known family "
                             f"({_pipelines()})")
    return fam


def _pipelines() -> str:
    return ", ".join(p for f in FAMILIES.values() for p in f.pipelines)


from .loading import load_transformer, load_vae  # noqa: E402 - they read a folder's family through the above
