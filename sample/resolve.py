"""What a sampling run needs, resolved and checked before any weight is read or any file written.

MODEL (a FLUX folder in diffusers' layout or a hub id) gives the VAE, text encoders and tokenizers;
the transformer comes from MODEL, a trainer's `final/` or `checkpoints/step-N/` folder, a diffusers
transformer folder or a single BFL-layout safetensors file; a LoRA adapter (diffusers' or peft's, a LoRA
run's `final/` or checkpoint) may sit on top. The sampling conventions
(text mode and length, schedule shift, steps, guidance) come from the trainer's `flux_prep.json` when
there is one, else from the published model's own configs.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from shared.adapters import LoraSource, safetensors_lora
from shared.bfl import read_shapes
from shared.family import FAMILIES, Family, family_of_transformer
from shared.models import (PICKLE_SUFFIXES, ModelLoadError, model_index, part_config, refuse_pickle,
                           require_safetensors, split_transformer_path)
from shared.run_files import LORA_WEIGHTS as DIFFUSERS_LORA
from shared.run_files import PEFT_CONFIG as ADAPTER_CONFIG
from shared.run_files import PEFT_WEIGHTS as ADAPTER_WEIGHTS
from shared.run_files import read_training_info
from shared.sampling import sampling_conventions

from . import checkpoints



class SampleError(Exception):
    """Bad input for flux-sample; the message is the one line shown to the user."""


@dataclass
class TransformerSource:
    # "model" (MODEL's transformer/), "folder" (a transformer folder), "bfl" (one BFL-layout file),
    # "checkpoint" (a trainer's checkpoints/step-N/model.safetensors: diffusers' keys, no config.json)
    kind: str
    path: str
    config: dict
    info: dict = field(default_factory=dict)   # flux_prep.json beside it, if any
    note: str = ""     # what the user should know about the weights used
    family: Family | None = None   # MODEL's (resolve_transformer sets it)


def _refuse_pickle(path) -> None:
    try:
        refuse_pickle(path)
    except ModelLoadError as e:
        raise SampleError(str(e)) from None


def resolve_transformer(family: Family, model: str, transformer: str | None) -> TransformerSource:
    """Where the transformer of MODEL's `family` comes from (see the module docstring), checked."""
    source = _resolve(family, model, transformer)
    source.family = family
    return source


def _resolve(family: Family, model: str, transformer: str | None) -> TransformerSource:
    if transformer is None:
        info = read_training_info(Path(model) / "transformer") if Path(model).is_dir() else {}
        return TransformerSource("model", model, part_config(model, "transformer"), info)
    path = Path(transformer)
    _refuse_pickle(path)
    if not path.exists():
        raise SampleError(f"{transformer}: no such transformer file or folder")
    if path.is_file():
        return _single_file(family, model, path)
    if checkpoints.is_checkpoint(path):
        return _checkpoint(family, model, path)
    folder, part = split_transformer_path(str(path))
    if part and (Path(folder) / part).is_dir():   # a whole model folder: take its transformer
        path = Path(folder) / part
    if not (path / "config.json").is_file():
        if (path / DIFFUSERS_LORA).is_file() or (path / ADAPTER_CONFIG).is_file():
            raise SampleError(f"{transformer}: a LoRA adapter, not a transformer; pass it with --lora")
        raise SampleError(f"{transformer}: not a transformer folder (no config.json)")
    require_safetensors(path)
    return TransformerSource("folder", str(path), json.loads((path / "config.json").read_text()),
                             read_training_info(path))


def _single_file(family: Family, model: str, path: Path) -> TransformerSource:
    if path.suffix != ".safetensors":
        raise SampleError(f"{path}: a single-file transformer must be .safetensors (BFL key layout)")
    try:
        shapes = read_shapes(path)
    except Exception as e:  # noqa: BLE001 -- a corrupt header
        raise SampleError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from e
    base = part_config(model, "transformer", required=False)
    try:
        return TransformerSource("bfl", str(path), family.bfl().config_from_shapes(shapes, base))
    except ValueError as e:
        other = next((f for f in FAMILIES.values() if f is not family and _reads(f, shapes)), None)
        if other is not None:
            raise SampleError(f"{path}: a {other.name} transformer, but --model is a {family.name} model folder: give "
                              f"the text encoders and VAE of its own family") from None
        raise SampleError(f"{path}: {e}") from None


def _reads(family: Family, shapes: dict) -> bool:
    """Whether `shapes` are a transformer of `family` in BFL's layout."""
    try:
        family.bfl().config_from_shapes(shapes)
        return True
    except (ValueError, KeyError):
        return False


def _checkpoint(family: Family, model: str, path: Path) -> TransformerSource:
    try:
        weights = checkpoints.full_weights(path)
        config = checkpoints.transformer_config(family, weights, part_config(model, "transformer", required=False))
    except checkpoints.CheckpointError as e:
        raise SampleError(str(e)) from None
    info = checkpoints.training_info(path)
    return TransformerSource("checkpoint", str(weights), config, info, checkpoints.weights_note(path, info))


def resolve_lora(lora: str | None) -> tuple[LoraSource | None, dict]:
    """The adapter (peft's save_pretrained folder, or diffusers' LoRA file or folder, which is what the
    trainer's final/ and checkpoints hold) and the training info saved beside it."""
    if lora is None:
        return None, {}
    path = Path(lora)
    _refuse_pickle(path)
    if path.is_file() and path.suffix == ".safetensors":
        return _diffusers_lora(path.parent, path.name), read_training_info(path.parent)
    if not path.is_dir():
        raise SampleError(f"{lora}: no such LoRA adapter folder")
    if checkpoints.is_checkpoint(path):
        try:
            weights = checkpoints.lora_weights(path)
        except checkpoints.CheckpointError as e:
            raise SampleError(str(e)) from None
        info = checkpoints.training_info(path)
        source = _diffusers_lora(path, weights.name)
        source.note = checkpoints.weights_note(path, info)
        return source, info
    if (path / ADAPTER_CONFIG).is_file() and (path / ADAPTER_WEIGHTS).is_file():
        return LoraSource("peft", path, ADAPTER_WEIGHTS), read_training_info(path)
    if (path / DIFFUSERS_LORA).is_file():
        return _diffusers_lora(path, DIFFUSERS_LORA), read_training_info(path)
    pickled = [f.name for f in path.iterdir() if f.name.endswith(PICKLE_SUFFIXES)]
    why = f"only pickled weights ({', '.join(pickled)}) refused; " if pickled else ""
    raise SampleError(f"{lora}: no LoRA weights ({ADAPTER_WEIGHTS} or {DIFFUSERS_LORA}); {why}"
                      "weights are read from safetensors only")


def _diffusers_lora(folder: Path, name: str) -> LoraSource:
    try:
        return safetensors_lora(folder, name)
    except ValueError as e:
        raise SampleError(str(e)) from None


def base_mismatch(lora_info: dict, lora: str, target: str, identity: dict) -> str | None:
    """A warning naming both when a LoRA's flux_prep.json records another base ("base": its source and
    transformer hash, or a random init) than the transformer `target` (`identity`: transformer_identity's)
    it is applied to. Adapters that record no base (older runs, others' adapters) are not checked."""
    base = lora_info.get("base") or {}
    if base.get("init") == "random":
        return (f"{lora} was trained on randomly initialised weights of {base.get('source')}'s config "
                f"(lora.allow_random_base), not on {target}: what it learned corrects those random weights")
    ours, theirs = base.get("sha256"), identity.get("sha256")
    if ours and theirs and ours != theirs:
        return (f"{lora} was trained on the transformer of {base.get('source')} (sha256 {ours[:16]}), and is "
                f"applied to {target} (sha256 {theirs[:16]}), other weights: its images may be wrong "
                "(--no-check-base silences this)")
    return None


def check_fit(family: Family, tcfg: dict, dims: dict, transformer: str) -> None:
    """The transformer must be of MODEL's family, and its input sizes match what MODEL's VAE and text
    encoders produce (`dims`: latent_channels and the family's text widths)."""
    other = family_of_transformer(tcfg) if "_class_name" in tcfg else None
    if other is not None and other.transformer_class != family.transformer_class:   # Kontext is FLUX.1's class
        raise SampleError(f"{transformer}: a {other.name} transformer ({tcfg['_class_name']}), but --model is a "
                          f"{family.name} model folder: give the text encoders and VAE of its own family")
    misfits = family.misfits(tcfg, dims)
    if "latent_channels" in misfits:
        latent_ch = dims["latent_channels"]
        raise SampleError(f"{transformer}: transformer takes {tcfg.get('in_channels')} input channels but the VAE "
                          f"has {latent_ch} latent channels (needs {4 * latent_ch} = 2x2 patches)")
    if "out_channels" in misfits:
        raise SampleError(f"{transformer}: transformer predicts {misfits['out_channels'][0]} channels, not its "
                          f"{tcfg['in_channels']} input channels")
    spec = family.text
    keys = spec.dim_keys()
    if keys[spec.states] in misfits:
        raise SampleError(f"{transformer}: transformer expects {spec.label} states of width "
                          f"{tcfg.get('joint_attention_dim')} but the model's {spec.label} encoder gives "
                          f"{dims[keys[spec.states]]}")
    if spec.pooled and keys[spec.pooled] in misfits:
        have, given = misfits[keys[spec.pooled]]
        raise SampleError(f"{transformer}: transformer expects a pooled {spec.pooled_label} vector of width {have} "
                          f"but the model's {spec.pooled_label} encoder gives {given}")


def _get(info: dict, key: str, nested: tuple[str, str] | None = None):
    if key in info:
        return info[key]
    if nested and isinstance(info.get(nested[0]), dict):
        return info[nested[0]].get(nested[1])
    return None


@dataclass
class Conventions:
    """How this transformer must be prompted and sampled (None: take the tokenizer's, see cli)."""
    text_mode: str
    text_max_length: int | None
    shift: bool
    steps: int
    guidance_embeds: bool
    guidance: float | None    # None: no guidance embedding
    cfg_scale: float
    resolution: int


def conventions(family: Family, model: str, tcfg: dict, info: dict, vae_cfg: dict) -> Conventions:
    """Defaults from the trainer's flux_prep.json, else from the published model's configs (shared/sampling.py
    holds the rules, which the trainer's own samples follow too)."""
    sched = part_config(model, "scheduler", "scheduler_config.json", required=False) or {}
    guidance_embeds = bool(tcfg.get("guidance_embeds", False))
    conv = sampling_conventions(family, info, guidance_embeds, model_index(model), sched)
    schedule, guidance, cfg = conv, conv["guidance"], conv["cfg_scale"]
    resolution = _get(info, "resolution") or vae_cfg.get("sample_size") or 1024
    if isinstance(resolution, (list, tuple)):
        resolution = resolution[0]
    return Conventions(
        text_mode=_get(info, "text_mode", ("t5", "mode")) or "padded",
        text_max_length=_get(info, "text_max_length", ("t5", "max_length")),
        shift=schedule["shift_schedule"],
        steps=schedule["default_steps"],
        guidance_embeds=guidance_embeds,
        guidance=guidance,
        cfg_scale=cfg,
        resolution=max(16, int(resolution) // 16 * 16),
    )


def read_prompts(prompt: list[str] | None, prompts_file: Path | None) -> list[str]:
    if bool(prompt) == (prompts_file is not None):
        raise SampleError("give either --prompt (repeatable) or --prompts-file, not both and not neither")
    if prompts_file is not None:
        if not prompts_file.is_file():
            raise SampleError(f"{prompts_file}: no such prompts file")
        try:
            lines = prompts_file.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise SampleError(f"{prompts_file}: not UTF-8 text") from None
        prompts = [p.strip() for p in lines if p.strip()]
        if not prompts:
            raise SampleError(f"{prompts_file}: no prompts (the file is empty)")
        return prompts
    return list(prompt)
