"""What a sampling run needs, resolved and checked before any weight is read or any file written.

MODEL (a FLUX folder in diffusers' layout or a hub id) gives the VAE, text encoders and tokenizers;
the transformer comes from MODEL, a trainer's `final/` folder, a diffusers transformer folder or a
single BFL-layout safetensors file; a LoRA adapter (peft) may sit on top. The sampling conventions
(T5 mode and length, schedule shift, steps, guidance) come from the trainer's `flux_prep.json` when
there is one, else from the published model's own configs.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from shared.models import PICKLE_SUFFIXES, ModelLoadError, read_training_info, refuse_pickle
from shared.sampling import guidance_conventions, schedule_conventions

from .bfl import config_from_shapes, read_shapes

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
DIFFUSERS_LORA = "pytorch_lora_weights.safetensors"


class SampleError(Exception):
    """Bad input for flux-sample; the message is the one line shown to the user."""


def _is_hub_id(model: str) -> bool:
    return not str(model).startswith((".", "/", "~")) and str(model).count("/") == 1


def part_config(model: str, part: str, filename: str = "config.json", required: bool = True) -> dict | None:
    """A part's config json, from a local folder or the hub cache (offline)."""
    path = Path(model)
    if path.exists():
        f = path / part / filename
        if f.is_file():
            return json.loads(f.read_text())
        if not required:
            return None
        raise SampleError(f"{model}: missing {part}/{filename}; expected diffusers' FLUX folder layout")
    if not _is_hub_id(model):
        raise SampleError(f"{model}: no such folder, and not a hub id of the form 'org/name'")
    try:
        from huggingface_hub import hf_hub_download
        return json.loads(Path(hf_hub_download(model, filename, subfolder=part)).read_text())
    except Exception as e:  # noqa: BLE001 -- any hub failure is the same one-line error
        if not required:
            return None
        raise SampleError(f"{model}: cannot read {part}/{filename} ({type(e).__name__})") from e


def _has_safetensors(folder: Path) -> None:
    files = list(folder.iterdir())
    if not any(f.suffix == ".safetensors" or f.name.endswith(".safetensors.index.json") for f in files):
        pickled = [f.name for f in files if f.name.endswith(PICKLE_SUFFIXES)]
        if pickled:
            raise SampleError(f"{folder}: only pickled weights ({', '.join(pickled)}); refused, since loading "
                              "one can run arbitrary code; convert to .safetensors")
        raise SampleError(f"{folder}: no .safetensors weights")


@dataclass
class TransformerSource:
    kind: str          # "model" (MODEL's transformer/), "folder" (a transformer folder), "bfl" (single file)
    path: str
    config: dict
    info: dict = field(default_factory=dict)   # flux_prep.json beside it, if any


def resolve_transformer(model: str, transformer: str | None) -> TransformerSource:
    if transformer is None:
        info = read_training_info(Path(model) / "transformer") if Path(model).is_dir() else {}
        return TransformerSource("model", model, part_config(model, "transformer"), info)
    path = Path(transformer)
    try:
        refuse_pickle(path)
    except ModelLoadError as e:
        raise SampleError(str(e)) from None
    if not path.exists():
        raise SampleError(f"{transformer}: no such transformer file or folder")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise SampleError(f"{transformer}: a single-file transformer must be .safetensors (BFL key layout)")
        try:
            shapes = read_shapes(path)
        except Exception as e:  # noqa: BLE001 -- a corrupt header
            raise SampleError(f"{transformer}: not a readable safetensors file ({str(e).splitlines()[0]})") from e
        base = part_config(model, "transformer", required=False)
        try:
            return TransformerSource("bfl", str(path), config_from_shapes(shapes, base))
        except ValueError as e:
            raise SampleError(f"{transformer}: {e}") from None
    if not (path / "config.json").is_file() and (path / "transformer" / "config.json").is_file():
        path = path / "transformer"    # a whole model folder: take its transformer
    if not (path / "config.json").is_file():
        if (path / DIFFUSERS_LORA).is_file() or (path / ADAPTER_CONFIG).is_file():
            raise SampleError(f"{transformer}: a LoRA adapter, not a transformer; pass it with --lora")
        raise SampleError(f"{transformer}: not a transformer folder (no config.json)")
    _has_safetensors(path)
    return TransformerSource("folder", str(path), json.loads((path / "config.json").read_text()),
                             read_training_info(path))


@dataclass
class LoraSource:
    kind: str          # "peft" (PeftModel.save_pretrained) or "diffusers" (save_lora_adapter, the trainer's)
    folder: Path
    weight_name: str


def resolve_lora(lora: str | None) -> tuple[LoraSource | None, dict]:
    """The adapter (peft's save_pretrained folder, or diffusers' save_lora_adapter folder or file, which is
    what the trainer's final/ holds) and the training info saved beside it."""
    if lora is None:
        return None, {}
    path = Path(lora)
    try:
        refuse_pickle(path)
    except ModelLoadError as e:
        raise SampleError(str(e)) from None
    if path.is_file() and path.suffix == ".safetensors":
        return LoraSource("diffusers", path.parent, path.name), read_training_info(path.parent)
    if not path.is_dir():
        raise SampleError(f"{lora}: no such LoRA adapter folder")
    if (path / ADAPTER_CONFIG).is_file() and (path / ADAPTER_WEIGHTS).is_file():
        return LoraSource("peft", path, ADAPTER_WEIGHTS), read_training_info(path)
    if (path / DIFFUSERS_LORA).is_file():
        return LoraSource("diffusers", path, DIFFUSERS_LORA), read_training_info(path)
    pickled = [f.name for f in path.iterdir() if f.name.endswith(PICKLE_SUFFIXES)]
    why = f"only pickled weights ({', '.join(pickled)}) refused; " if pickled else ""
    raise SampleError(f"{lora}: no LoRA weights ({ADAPTER_WEIGHTS} or {DIFFUSERS_LORA}); {why}"
                      "weights are read from safetensors only")


def check_fit(tcfg: dict, vae_cfg: dict, t5_cfg: dict, clip_cfg: dict, transformer: str) -> None:
    """The transformer's input sizes must match what MODEL's VAE and text encoders produce."""
    latent_ch = vae_cfg.get("latent_channels")
    if tcfg.get("in_channels") != 4 * latent_ch:
        raise SampleError(f"{transformer}: transformer takes {tcfg.get('in_channels')} input channels but the VAE "
                          f"has {latent_ch} latent channels (needs {4 * latent_ch} = 2x2 patches)")
    out_ch = tcfg.get("out_channels") or tcfg.get("in_channels")
    if out_ch != tcfg.get("in_channels"):
        raise SampleError(f"{transformer}: transformer predicts {out_ch} channels, not its {tcfg['in_channels']} "
                          "input channels")
    d_model = t5_cfg.get("d_model")
    if tcfg.get("joint_attention_dim") != d_model:
        raise SampleError(f"{transformer}: transformer expects T5 states of width {tcfg.get('joint_attention_dim')} "
                          f"but the model's T5 encoder gives {d_model}")
    clip_dim = clip_cfg.get("hidden_size")
    if tcfg.get("pooled_projection_dim") != clip_dim:
        raise SampleError(f"{transformer}: transformer expects a pooled CLIP vector of width "
                          f"{tcfg.get('pooled_projection_dim')} but the model's CLIP encoder gives {clip_dim}")


def _get(info: dict, key: str, nested: tuple[str, str] | None = None):
    if key in info:
        return info[key]
    if nested and isinstance(info.get(nested[0]), dict):
        return info[nested[0]].get(nested[1])
    return None


@dataclass
class Conventions:
    """How this transformer must be prompted and sampled (None: take the tokenizer's, see cli)."""
    t5_mode: str
    t5_max_length: int | None
    shift: bool
    steps: int
    guidance_embeds: bool
    guidance: float | None    # None: no guidance embedding
    cfg_scale: float
    resolution: int


def conventions(model: str, tcfg: dict, info: dict, vae_cfg: dict) -> Conventions:
    """Defaults from the trainer's flux_prep.json, else from the published model's configs (shared/sampling.py
    holds the rules, which the trainer's own samples follow too)."""
    sched = part_config(model, "scheduler", "scheduler_config.json", required=False) or {}
    schedule = schedule_conventions(info, sched)
    guidance_embeds = bool(tcfg.get("guidance_embeds", False))
    guidance, cfg = guidance_conventions(info, guidance_embeds)
    resolution = _get(info, "resolution") or vae_cfg.get("sample_size") or 1024
    if isinstance(resolution, (list, tuple)):
        resolution = resolution[0]
    return Conventions(
        t5_mode=_get(info, "t5_mode", ("t5", "mode")) or "padded",
        t5_max_length=_get(info, "t5_max_length", ("t5", "max_length")),
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
