"""The one home of what a training run leaves for the other stages (the trainer writes it; flux-sample, export
and a later run read it): the folder layout, the weight files' names, and flux_prep.json, the training info.

    RUN/final/                 config.json + diffusion_pytorch_model.safetensors (full weights), or
                               pytorch_lora_weights.safetensors (a LoRA, keys under "transformer."), and
                               flux_prep.json; final/ema/ likewise
    RUN/checkpoints/step-N/    accelerate's state (model.safetensors or the LoRA file, optimizer, ...),
                               flux_prep.json, trainer_state.json; written as step-N.tmp, then renamed
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

FINAL = "final"
EMA = "ema"
CHECKPOINTS = "checkpoints"
STEP_DIR = re.compile(r"^step-(\d+)$")
TRAINING_INFO = "flux_prep.json"
TRANSFORMER_WEIGHTS = "diffusion_pytorch_model.safetensors"   # diffusers' from_pretrained file
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"             # diffusers' save/load_lora_weights file
LORA_PREFIX = "transformer"      # the pipelines' name of the model a LoRA file's keys belong to
MODEL_WEIGHTS = "model.safetensors"                 # accelerate's save_state of the first prepared model
OLD_LORA_WEIGHTS = "lora_adapter.safetensors"       # checkpoints before they held final/'s adapter file
PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"   # peft's save_pretrained

# flux_prep.json's keys before text encoders had family-neutral names
_OLD_KEYS = {"t5_mode": "text_mode", "t5_max_length": "text_max_length"}


@dataclass
class TrainingInfo:
    """flux_prep.json: how the model a run trained must be prompted and sampled, and what it was trained from.
    The trainer writes it in final/, final/ema/ and each checkpoint; readers take `read_training_info`'s dict
    (older files' keys renamed), so that a key added here is read as None from an older file."""
    family: str
    text_mode: str                     # the cache's text mode (padded, trimmed) and length
    text_max_length: int
    shift_schedule: bool               # sampling conventions (shared/sampling.py sampling_conventions)
    default_steps: int
    guidance_dropout: float
    guidance_dropout_mode: str
    latent: str
    guidance_embeds: bool
    guidance: float | None             # the guidance embedding's value trained with (None: none)
    resolution: int | None
    base_model: str                    # model.name, its init, and the base's identity (source, hash)
    init: str
    base: dict | None
    timestep_sampler: str
    steps_trained: int
    lora: dict | None                  # rank, alpha, the adapter file
    train_cache: str
    ema_decay: float
    renders_in: list = field(default_factory=list)   # the tools that render it as trained (render_tools.py)
    renders_note: str | None = None
    ema: bool = False                  # these weights are the EMA's

    def to_dict(self) -> dict:
        out = asdict(self)
        if out["renders_note"] is None:
            del out["renders_note"]
        return out


def read_training_info(folder) -> dict:
    """A folder's flux_prep.json as a dict (empty for published weights, which have none), older keys renamed."""
    path = Path(folder) / TRAINING_INFO
    if not path.is_file():
        return {}
    info = json.loads(path.read_text())
    return {_OLD_KEYS.get(k, k): v for k, v in info.items()}


def step_dir(output_dir, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f"step-{step}"


def write_lora_weights(family, folder, adapter: dict, config: dict) -> Path:
    """An adapter as the family's diffusers pipeline writes it (save_lora_weights: LORA_WEIGHTS, peft's key
    names under `transformer.`, the peft config in the metadata): the trainer's final/ and checkpoints, export
    --format diffusers and lora extract. The same bytes for the same adapter in every process: the config's
    sets sorted (diffusers lists them in set order) and the header's metadata keys sorted."""
    import diffusers

    from .safetensors_order import canonicalize_file
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    folder = Path(folder)
    getattr(diffusers, family.lora_pipeline).save_lora_weights(
        str(folder), transformer_lora_layers={k: v.detach().contiguous().cpu() for k, v in adapter.items()},
        transformer_lora_adapter_metadata=config)
    canonicalize_file(folder / LORA_WEIGHTS)
    return folder / LORA_WEIGHTS
