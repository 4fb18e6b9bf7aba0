"""Loading the parts of a model folder in diffusers' layout or a hub id (a family says which it has).

Weights are read from safetensors only, and no remote code is ever run: a pickled
checkpoint can execute code when loaded, so every loader here refuses one.
"""
from __future__ import annotations

import json
from pathlib import Path


# The parts of a model folder in diffusers' layout; a family names what each of its own is (family/).
PARTS = {
    "vae": "the VAE",
    "transformer": "the transformer",
    "text_encoder": "the text encoder",
    "text_encoder_2": "the second text encoder",
    "tokenizer": "the tokenizer",
    "tokenizer_2": "the second tokenizer",
    "scheduler": "the noise schedule",
}
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


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


def _source(model: str, part: str, what: str | None = None) -> tuple[str, dict]:
    """Where `from_pretrained` finds `part` (`what` it is, for messages): a local sub-folder, or the hub
    id with `subfolder`."""
    if part not in PARTS:
        raise ValueError(f"unknown model part {part!r}")
    path = Path(model)
    if path.exists():
        sub = path / part
        if not sub.is_dir():
            raise ModelLoadError(f"{model}: missing {part}/ ({what or PARTS[part]}); expected diffusers' FLUX "
                                 "folder layout")
        return str(sub), {}
    if not is_hub_id(model):
        raise ModelLoadError(f"{model}: no such folder, and not a hub id of the form 'org/name'")
    return str(model), {"subfolder": part}


def load_part(loader, model: str, part: str, what: str | None = None, **kwargs):
    """`loader` (a from_pretrained) of one part of `model`, safetensors only; errors name the part."""
    src, extra = _source(model, part, what)
    what = what or PARTS[part]
    local = Path(src).is_dir()
    if local and part not in ("tokenizer", "tokenizer_2"):
        require_safetensors(Path(src), what)
    if not local:
        check_hub_reachable(model, part)
    try:
        return loader(src, **extra, **kwargs)
    except (OSError, ValueError, EnvironmentError) as e:
        if not local and offline():
            raise ModelLoadError(not_here_offline(model, part)) from e
        raise ModelLoadError(f"{model}: cannot load {part} ({what}): {str(e).splitlines()[0]}") from e


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


def model_identity(model: str, part: str, what: str | None = None) -> dict:
    """What identifies a part's weights for a cache manifest: its source and a hash of its files.

    The hash covers each safetensors file's name, size and header (tensor names, shapes,
    dtypes, offsets) and its first and last MiB; hashing 10 GB of T5 on every run would
    cost more than it protects."""
    src, extra = _source(model, part, what)
    info = {"source": str(model), "part": part}
    folder = Path(src)
    if not folder.is_dir():
        return info | {"sha256": None}
    return info | {"sha256": folder_sha256(folder)}


def folder_sha256(folder: Path) -> str:
    """model_identity's hash of a weights folder: each safetensors file's name, size, header and first
    and last MiB, and its config.json."""
    import hashlib
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
    return h.hexdigest()


def transformer_identity(name: str) -> dict:
    """{"source": name, "sha256": ...} of the transformer that `name` (a model folder or hub id, whose
    transformer/ it is, or a transformer folder) loads: what a LoRA run records as its base and
    flux-sample compares with the transformer it applies the adapter to. sha256 is None where the
    files are not on this machine (a hub id not in the local hub cache)."""
    model, part = split_transformer_path(name)
    folder = Path(model) / part if part else Path(model)
    if not folder.is_dir() and is_hub_id(model):
        folder = _hub_cached_part(model, part)
    return {"source": str(name), "sha256": folder_sha256(folder) if folder and folder.is_dir() else None}


def _hub_cached_part(model: str, part: str) -> Path | None:
    """A hub model's part folder in the local hub cache (its newest snapshot), or None; never downloads."""
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(model, allow_patterns=[f"{part}/*"], local_files_only=True)) / part
    except Exception:  # noqa: BLE001 -- not cached, or the hub client's many error types: unknown
        return None


def model_index(model: str) -> dict | None:
    """A model folder's (or cached hub model's) model_index.json, None where it has none."""
    path = Path(model) / "model_index.json"
    if path.is_file():
        return json.loads(path.read_text())
    if Path(model).exists():
        return None
    if not is_hub_id(model):
        raise ModelLoadError(f"{model}: no such folder, and not a hub id of the form 'org/name'")
    from huggingface_hub import hf_hub_download
    try:
        return json.loads(Path(hf_hub_download(model, "model_index.json")).read_text())
    except Exception as e:  # noqa: BLE001 - the hub client's many error types, named once
        if offline():
            raise ModelLoadError(not_here_offline(model, "model_index.json")) from e
        raise ModelLoadError(f"{model}: cannot read model_index.json ({str(e).splitlines()[0]})") from e
