"""One flux-sample run: check everything, encode the prompts, load the transformer, denoise, write PNGs.

Order matters for memory and for failing early: all inputs are checked from configs and file headers
first (nothing loaded, nothing written); the text encoders run once over every prompt and leave memory
before the transformer loads (FLUX.1's T5-XXL and its 12B transformer, or FLUX.2 [dev]'s 24B Mistral and its 32B
transformer, never sit on the GPU together).
"""
from __future__ import annotations

import gc
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from shared.cache.schema import dtype_name
from shared.devices import DeviceError, resolve_device
from shared.family import Family, family_of_model
from shared.models import ModelLoadError, transformer_identity
from shared.family import load_transformer, load_vae
from shared.precision import DTYPE_ALIASES, resolve_dtype
from shared.adapters import merge_adapter
from shared.sampling import decode, denoise, guided_batch, initial_noise
from shared.text_batch import TEXT_PAD_MULTIPLE, PromptEncoding

from shared import image_files as output
from .loop import configure_speed
from .references import encode_references, planned_references
from .resolve import (SampleError, base_mismatch, check_fit, conventions, part_config, read_prompts,
                      resolve_lora, resolve_transformer)


@dataclass
class SampleOptions:
    model: str
    output: Path
    prompts: list[str] | None = None
    prompts_file: Path | None = None
    transformer: str | None = None
    lora: str | None = None
    seeds: list[int] = field(default_factory=lambda: [0])
    steps: int | None = None
    width: int | None = None
    height: int | None = None
    guidance: float | None = None
    cfg_scale: float | None = None
    batch_size: int = 1
    grid: bool = False
    device: str = "auto"
    dtype: str = "auto"
    text_mode: str | None = None
    text_max_length: int | None = None
    compile: bool = False
    attention_backend: str = "default"
    cudnn_sdpa: bool = True
    fuse_qkv: bool = False
    precision: str = "bf16"   # fp8: the transformer's token-wise linear layers compute in float8 (shared/float8.py)
    progress: bool = True
    check_base: bool = True   # warn when a LoRA's recorded base is not the transformer it is applied to
    images: list[Path] = field(default_factory=list)   # reference images (edit models: sample/references.py)
    reference_size: str | None = None                  # WxH for every reference (default: the family's)
    reference_resolution: int | None = None            # an area cap for every reference, as encode's


def _device_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """auto device: the GPU when CUDA is available, else the CPU; auto dtype: bfloat16 on a GPU, float32 on the CPU."""
    try:
        dev = resolve_device(device)
    except DeviceError as e:
        raise SampleError(str(e)) from None
    if dtype == "auto":
        dtype = "bfloat16" if dev.type == "cuda" else "float32"
    try:
        return dev, resolve_dtype(dtype)
    except ValueError:
        raise SampleError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(DTYPE_ALIASES)}") from None


@dataclass
class Plan:
    """Everything checked: what to load and how to sample."""
    family: Family
    prompts: list[str]
    source: object
    lora: object          # resolve.LoraSource | None
    conv: object
    width: int
    height: int
    steps: int
    guidance: float | None
    cfg_scale: float
    text_mode: str
    device: torch.device
    dtype: torch.dtype
    warnings: list[str] = field(default_factory=list)
    ref_images: list = field(default_factory=list)   # each --image prepared (PIL, at its reference size)


def plan(opts: SampleOptions) -> Plan:
    """Check every input without loading weights or writing anything; raise SampleError naming the problem."""
    prompts = read_prompts(opts.prompts, opts.prompts_file)
    if opts.output.exists() and not opts.output.is_dir():
        raise SampleError(f"{opts.output}: exists and is not a folder")
    if opts.batch_size < 1:
        raise SampleError(f"--batch-size must be at least 1, got {opts.batch_size}")
    if not opts.seeds:
        raise SampleError("no seeds")
    device, dtype = _device_dtype(opts.device, opts.dtype)
    _check_precision(opts.precision, device)
    try:
        family = family_of_model(opts.model)
    except ModelLoadError as e:
        raise SampleError(str(e)) from None
    source = resolve_transformer(family, opts.model, opts.transformer)
    lora, lora_info = resolve_lora(opts.lora)
    try:
        vae_cfg = part_config(opts.model, "vae")
        dims = {"latent_channels": vae_cfg.get("latent_channels"), **family.text_dims(opts.model)}
    except ModelLoadError as e:
        raise SampleError(str(e)) from None
    label = opts.transformer or f"{opts.model} (transformer)"
    check_fit(family, source.config, dims, label)
    conv = conventions(family, opts.model, source.config, {**source.info, **lora_info}, vae_cfg)
    width, height = opts.width or conv.resolution, opts.height or conv.resolution
    if width <= 0 or height <= 0 or width % 16 or height % 16:
        raise SampleError(f"width and height must be positive multiples of 16, got {width}x{height}")
    steps = opts.steps or conv.steps
    if steps < 1:
        raise SampleError(f"--steps must be at least 1, got {steps}")
    cfg = conv.cfg_scale if opts.cfg_scale is None else opts.cfg_scale
    if cfg < 1.0:
        raise SampleError(f"--cfg-scale must be 1 (off) or more, got {cfg}")
    text_mode = opts.text_mode or conv.text_mode
    if text_mode not in family.text.modes:
        raise SampleError(f"unknown {family.text.label} mode {text_mode!r}; choose {' or '.join(family.text.modes)}")
    guidance = (conv.guidance if opts.guidance is None else opts.guidance) if conv.guidance_embeds else None
    warnings = [w for w in [_lora_base_warning(opts, source, lora_info, label)] if w]
    ref_images = planned_references(family, opts.images, opts.reference_size, opts.reference_resolution)
    return Plan(family, prompts, source, lora, conv, width, height, steps, guidance, cfg, text_mode, device, dtype,
                warnings, ref_images)


def _check_precision(precision: str, device: torch.device) -> None:
    if precision not in ("bf16", "fp8"):
        raise SampleError(f"unknown --precision {precision!r}; choose bf16 or fp8")
    if precision == "fp8":
        from shared.float8 import require_float8
        try:
            require_float8(device, "--precision fp8")
        except ModelLoadError as e:
            raise SampleError(str(e)) from None


def _lora_base_warning(opts: SampleOptions, source, lora_info: dict, label: str) -> str | None:
    """Whether the LoRA's recorded base is the transformer it is applied to (hashed only when there is a record)."""
    if opts.lora is None or not opts.check_base or not lora_info.get("base"):
        return None
    folder = {"model": opts.model, "folder": source.path}.get(source.kind)
    identity = transformer_identity(folder) if folder else {}
    return base_mismatch(lora_info, opts.lora, label, identity)


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def encode(opts: SampleOptions, p: Plan) -> tuple[list[PromptEncoding], PromptEncoding | None, int]:
    """Every prompt's encoding (and the empty prompt's for CFG), made before the transformer loads; the text
    encoders then leave memory. Returns them and the text length used."""
    encoder = p.family.load_text_encoder(opts.model, p.device, p.dtype, mode=p.text_mode,
                                         max_length=opts.text_max_length or p.conv.text_max_length,
                                         options=p.family.sampling_text_options)
    texts = p.prompts + ([""] if p.cfg_scale > 1.0 else [])
    enc = encoder.prompt_encodings(texts, batch_size=max(1, opts.batch_size))
    max_len = encoder.max_length
    del encoder
    _release_memory()
    return enc[:len(p.prompts)], (enc[-1] if p.cfg_scale > 1.0 else None), max_len


def load_sampling_transformer(src, lora, dtype, device, *, compile_blocks: bool = False,
                              attention_backend: str = "default", cudnn_sdpa: bool = True, fuse_qkv: bool = False,
                              precision: str = "bf16"):
    """The transformer of a resolved source, the LoRA adapter merged in, set up for speed (fp8: converted to
    float8 after the merge, so that the adapter's delta is rounded once, with the weight it joins; loaded,
    merged and converted in host memory, then moved, so that the device never holds the bf16 weights: the
    12B's 22 GiB become 11.1)."""
    final_device = device
    if precision == "fp8":
        device = torch.device("cpu")
    if src.kind == "bfl":
        try:
            model = src.family.bfl().load_bfl_transformer(Path(src.path), src.config, dtype, device)
        except ValueError as e:
            raise SampleError(f"{src.path}: {e}") from None
    elif src.kind == "checkpoint":
        model = _checkpoint_transformer(src, dtype, device)
    else:
        part = "transformer" if src.kind == "model" else None
        model = load_transformer(src.path, dtype, device, part=part)
    if lora is not None:
        # Merged: the loop then runs plain Linear layers (and compiles) as without an adapter.
        try:
            model = merge_adapter(model, lora, src.family)
        except Exception as e:  # noqa: BLE001 -- an adapter for another model: one line, not a trace
            msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            raise SampleError(f"{lora.folder}: cannot apply the LoRA adapter ({msg})") from e
    model = configure_speed(model.eval(), compile_blocks=compile_blocks, attention_backend=attention_backend,
                            cudnn_sdpa=cudnn_sdpa, fuse_qkv=fuse_qkv,
                            float8_family=src.family if precision == "fp8" else None)
    return model.to(final_device)   # block compilation happens at the first call, on the device


def _checkpoint_transformer(src, dtype, device):
    """A trainer checkpoint's model.safetensors: diffusers' keys, the config read from its shapes."""
    from safetensors.torch import load_file

    try:
        return src.family.bfl().transformer_from_state(src.config, load_file(src.path), dtype, device)
    except RuntimeError as e:   # keys the config does not account for
        raise SampleError(f"{src.path}: not the weights of one FLUX transformer ({str(e).splitlines()[0]})") from None


def run(opts: SampleOptions) -> list[Path]:
    """Sample every (prompt, seed); returns the PNG paths written."""
    p = plan(opts)
    for note in (p.source.note, p.lora.note if p.lora else ""):
        if note:
            print(f"flux-sample: {note}", file=sys.stderr)
    for warning in p.warnings:
        print(f"flux-sample: warning: {warning}", file=sys.stderr)
    try:
        cond, empty, max_len = encode(opts, p)
        transformer = load_sampling_transformer(p.source, p.lora, p.dtype, p.device, compile_blocks=opts.compile,
                                                attention_backend=opts.attention_backend, cudnn_sdpa=opts.cudnn_sdpa,
                                                fuse_qkv=opts.fuse_qkv, precision=opts.precision)
        vae = load_vae(opts.model, p.dtype, p.device, p.family)
        refs = encode_references(p.family, vae, p.ref_images, p.device, p.dtype)
    except ModelLoadError as e:
        raise SampleError(str(e)) from None
    jobs = [(i, s) for i in range(len(p.prompts)) for s in opts.seeds]
    # A compiled transformer meets trimmed text in a few length buckets, not one shape per prompt.
    pad_multiple = TEXT_PAD_MULTIPLE if opts.compile and p.text_mode == "trimmed" else None
    col = p.family.text.states
    meta = {"model": opts.model, "transformer": opts.transformer or f"{opts.model}/transformer",
            "lora": opts.lora or "", "steps": p.steps, "guidance": p.guidance, "cfg_scale": p.cfg_scale,
            "width": p.width, "height": p.height, f"{col}_mode": p.text_mode, f"{col}_max_length": max_len,
            "shift_schedule": p.conv.shift, "dtype": dtype_name(p.dtype), "software": "flux-sample",
            **({"images": " ".join(map(str, opts.images)),
                "reference_sizes": " ".join(f"{im.width}x{im.height}" for im in p.ref_images)}
             if opts.images else {}),
            **({"precision": opts.precision} if opts.precision != "bf16" else {})}   # bf16 images: as before
    written, entries, images = [], [], []
    batches = [jobs[i:i + opts.batch_size] for i in range(0, len(jobs), opts.batch_size)]
    bar = tqdm(total=len(jobs), desc="images", unit="img", disable=not opts.progress)
    steps_bar = tqdm(total=p.steps * len(batches), desc="steps", unit="step", leave=False, disable=not opts.progress)
    for batch in batches:
        text = guided_batch([cond[i] for i, _ in batch], empty, pad_multiple)
        noise = initial_noise(p.family, transformer.config.in_channels // 4, [s for _, s in batch], p.height, p.width,
                              p.device, p.dtype)
        x0 = denoise(p.family, transformer, noise, text, height_px=p.height, width_px=p.width, steps=p.steps,
                     shift=p.conv.shift, guidance=p.guidance, cfg_scale=p.cfg_scale, progress=steps_bar, refs=refs)
        pixels = decode(p.family, vae, x0, p.height, p.width).numpy()
        for (i, seed), img in zip(batch, pixels):
            path = opts.output / output.image_name(i, p.prompts[i], seed)
            output.save_png(img, path, {"prompt": p.prompts[i], "seed": seed, **meta})
            written.append(path)
            entries.append({"file": path.name, "prompt": p.prompts[i], "seed": seed})
            images.append(img)
            bar.update(1)
    steps_bar.close()
    bar.close()
    if opts.grid:
        output.save_png(output.make_grid(images, len(opts.seeds)), opts.output / output.GRID_NAME, meta)
    output.write_index(opts.output, entries)
    return written
