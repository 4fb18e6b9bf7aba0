"""Loading the five parts of a FLUX model from a folder in diffusers' layout or a hub id.

Weights are read from safetensors only, and no remote code is ever run: a pickled
checkpoint can execute code when loaded, so every loader here refuses one.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

PARTS = {
    "vae": "the VAE (AutoencoderKL)",
    "transformer": "the Flux transformer",
    "text_encoder": "the CLIP text encoder",
    "text_encoder_2": "the T5 text encoder",
    "tokenizer": "the CLIP tokenizer",
    "tokenizer_2": "the T5 tokenizer",
    "scheduler": "the noise schedule",
}
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
# Written beside a trained transformer's config.json: how it must be prompted and sampled.
TRAINING_INFO = "flux_prep.json"


class ModelLoadError(Exception):
    """A model part that cannot be loaded; the message names the part and the path."""


def refuse_pickle(path) -> None:
    """Refuse pickled checkpoints: loading one can run arbitrary code."""
    if str(path).lower().endswith(PICKLE_SUFFIXES):
        raise ModelLoadError(f"{path}: pickled checkpoints are refused (loading one can run arbitrary code); "
                             "convert it to .safetensors")


def is_hub_id(name) -> bool:
    """Whether `name` can be a hub id ('org/name'): not a path that starts like one, exactly one slash."""
    return not str(name).startswith((".", "/", "~")) and str(name).count("/") == 1


def require_safetensors(folder: Path, what: str = "") -> None:
    """Refuse a weights folder with no safetensors file, naming any pickled files it holds instead."""
    files = list(folder.iterdir())
    if any(f.suffix == ".safetensors" or f.name.endswith(".safetensors.index.json") for f in files):
        return
    pickled = [f.name for f in files if f.name.endswith(PICKLE_SUFFIXES)]
    why = (f" (only pickled weights: {', '.join(pickled)}; refused, since loading one can run arbitrary code: "
           "convert to .safetensors)") if pickled else ""
    raise ModelLoadError(f"{folder}: no .safetensors weights{f' for {what}' if what else ''}{why}")


def split_transformer_path(name: str) -> tuple[str, str | None]:
    """(model, part) for the loaders: a transformer folder itself (its own config.json), or a model folder or
    hub id, whose transformer is its transformer/ part."""
    path = Path(name)
    if path.is_dir() and (path / "config.json").is_file() and not (path / "transformer" / "config.json").is_file():
        return str(path), None
    return name, "transformer"


def _source(model: str, part: str) -> tuple[str, dict]:
    """Where `from_pretrained` finds `part`: a local sub-folder, or the hub id with `subfolder`."""
    if part not in PARTS:
        raise ValueError(f"unknown model part {part!r}")
    path = Path(model)
    if path.exists():
        sub = path / part
        if not sub.is_dir():
            raise ModelLoadError(f"{model}: missing {part}/ ({PARTS[part]}); expected diffusers' FLUX folder layout")
        return str(sub), {}
    if not is_hub_id(model):
        raise ModelLoadError(f"{model}: no such folder, and not a hub id of the form 'org/name'")
    return str(model), {"subfolder": part}


def _load(loader, model: str, part: str, **kwargs):
    src, extra = _source(model, part)
    local = Path(src).is_dir()
    if local and part not in ("tokenizer", "tokenizer_2"):
        require_safetensors(Path(src), PARTS[part])
    if not local:
        check_hub_reachable(model, part)
    try:
        return loader(src, **extra, **kwargs)
    except (OSError, ValueError, EnvironmentError) as e:
        if not local and offline():
            raise ModelLoadError(not_here_offline(model, part)) from e
        raise ModelLoadError(f"{model}: cannot load {part} ({PARTS[part]}): {str(e).splitlines()[0]}") from e


def offline() -> bool:
    """Whether the hub may not be reached (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE set)."""
    import os
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE",
                                                                                   "TRANSFORMERS_OFFLINE"))


def not_here_offline(model: str, part: str) -> str:
    import os
    return (f"{model}: no such folder here ({os.getcwd()}; a relative path is read from the current folder), "
            f"and as a hub id its {part} is not downloaded, and the network is unreachable or HF_HUB_OFFLINE "
            "is set (the hub is offline)")


# The file of each part that says whether it is in the local hub cache.
PART_CONFIG = {"tokenizer": "tokenizer_config.json", "tokenizer_2": "tokenizer_config.json",
               "scheduler": "scheduler_config.json"}


def check_hub_reachable(model: str, part: str) -> None:
    """A hub id's `part` that is not in the local hub cache must be downloaded: refuse it at once when the
    hub cannot be reached (offline mode, or no network). huggingface_hub retries an unreachable hub for
    about 25 s a file before the loaders say only that the repo 'does not appear to have a file named
    config.json'. One request without retries decides; an answer from the hub (a missing or gated repo)
    is left to the loader, whose message names it."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError
    filename = f"{part}/{PART_CONFIG.get(part, 'config.json')}"
    if isinstance(try_to_load_from_cache(model, filename), str):
        return
    if offline():
        raise ModelLoadError(not_here_offline(model, part))
    try:
        get_hf_file_metadata(hf_hub_url(model, filename))   # no retries (its default)
    except HfHubHTTPError:
        return
    except Exception as e:  # noqa: BLE001 - the transport's errors (refused, no DNS, timed out), whatever its library
        raise ModelLoadError(f"{not_here_offline(model, part)} ({type(e).__name__})") from e


def load_vae(model: str, dtype=torch.float32, device="cpu"):
    from diffusers import AutoencoderKL
    return _load(AutoencoderKL.from_pretrained, model, "vae", torch_dtype=dtype, use_safetensors=True).to(device).eval()


def load_transformer(model: str, dtype=torch.float32, device="cpu", part: str = "transformer"):
    """The transformer of a model folder/hub id; `part=None` reads `model` itself as a transformer folder."""
    from diffusers import FluxTransformer2DModel
    if part is None:
        path = Path(model)
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{model}: not a transformer folder (no config.json)")
        try:
            return FluxTransformer2DModel.from_pretrained(str(path), torch_dtype=dtype, use_safetensors=True).to(device)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"{model}: cannot load the transformer: {str(e).splitlines()[0]}") from e
    return _load(FluxTransformer2DModel.from_pretrained, model, part, torch_dtype=dtype,
                 use_safetensors=True).to(device)


def load_t5(model: str, dtype=torch.float32, device="cpu"):
    """(tokenizer, encoder) for T5."""
    from transformers import AutoTokenizer, T5EncoderModel
    tok = _load(AutoTokenizer.from_pretrained, model, "tokenizer_2", trust_remote_code=False)
    enc = _load(T5EncoderModel.from_pretrained, model, "text_encoder_2", dtype=dtype, use_safetensors=True,
                trust_remote_code=False)
    return tok, enc.to(device).eval()


def load_t5_tokenizer(model: str):
    """T5's tokenizer alone (no weights)."""
    from transformers import AutoTokenizer
    return _load(AutoTokenizer.from_pretrained, model, "tokenizer_2", trust_remote_code=False)


def part_config(model: str, part: str, filename: str = "config.json", required: bool = True) -> dict | None:
    """A part's config json (`filename`), without its weights, from a local folder or the hub cache;
    None where it is missing and not `required`."""
    try:
        src, extra = _source(model, part)
        if Path(src).is_dir():
            path = Path(src) / filename
        else:
            path = _hub_file(model, part, filename)
        if not path.is_file():
            raise ModelLoadError(f"{path}: missing ({PARTS[part]})")
    except ModelLoadError:
        if required:
            raise
        return None
    return json.loads(path.read_text())


def _hub_file(model: str, part: str, filename: str) -> Path:
    from huggingface_hub import hf_hub_download
    check_hub_reachable(model, part)
    try:
        return Path(hf_hub_download(model, filename, subfolder=part))
    except Exception as e:  # noqa: BLE001 - the hub client's many error types, named once
        if offline():
            raise ModelLoadError(not_here_offline(model, part)) from e
        raise ModelLoadError(f"{model}: cannot read {part}/{filename} ({str(e).splitlines()[0]})") from e


def load_clip(model: str, dtype=torch.float32, device="cpu"):
    """(tokenizer, encoder) for CLIP-L's text tower."""
    from transformers import AutoTokenizer, CLIPTextModel
    tok = _load(AutoTokenizer.from_pretrained, model, "tokenizer", trust_remote_code=False)
    enc = _load(CLIPTextModel.from_pretrained, model, "text_encoder", dtype=dtype, use_safetensors=True,
                trust_remote_code=False)
    return tok, enc.to(device).eval()


def model_identity(model: str, part: str) -> dict:
    """What identifies a part's weights for a cache manifest: its source and a hash of its files.

    The hash covers each safetensors file's name, size and header (tensor names, shapes,
    dtypes, offsets) and its first and last MiB; hashing 10 GB of T5 on every run would
    cost more than it protects."""
    import hashlib
    src, extra = _source(model, part)
    info = {"source": str(model), "part": part}
    folder = Path(src)
    if not folder.is_dir():
        return info | {"sha256": None}
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            h.update(fh.read(min(header_len, 100 << 20)))
            h.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            h.update(fh.read(1 << 20))
    cfg = folder / "config.json"
    if cfg.is_file():
        h.update(cfg.read_bytes())
    return info | {"sha256": h.hexdigest()}


def read_training_info(transformer_dir) -> dict:
    """The sampling conventions a trainer saved beside a transformer (empty for published weights)."""
    path = Path(transformer_dir) / TRAINING_INFO
    return json.loads(path.read_text()) if path.is_file() else {}
