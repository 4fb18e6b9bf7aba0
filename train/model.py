"""Building the transformer to train: a preset or a model folder, random init or published weights,
plus the options that change the module (LoRA, activation checkpointing, compile) and the EMA."""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch

from shared.family import Family, family_of_model, get_family
from shared.models import ModelLoadError, model_index, split_transformer_path, transformer_identity
from shared.family import load_transformer
from shared.float8 import float8_layer
from shared.run_files import TRAINING_INFO, read_training_info
from shared.sampling import sampling_conventions
from shared.presets import PRESETS, get_preset, transformer_config

from .adapters import peft_config
from .config import LoraConfig, ModelConfig, TrainConfig
from .quantize import quantize_block


def model_family(cfg: ModelConfig) -> Family:
    """The family of model.name: a preset's, else the model folder's (its model_index.json)."""
    if cfg.name in PRESETS:
        return get_family(get_preset(cfg.name).family)
    model, part = split_transformer_path(cfg.name)
    return family_of_model(model)


def build_transformer(cfg: ModelConfig, seed: int = 0, device="cpu", dtype=torch.float32):
    """The transformer to train (its family's class), its weights in `dtype` (fp32, or bf16 for LoRA's
    frozen base and for bf16 training); mixed precision casts per op.

    Published weights load on the host straight into `dtype` (place() then moves them block by block).
    A random init is built directly on `device` (initialising billions of weights on the host is slow)."""
    if cfg.init == "pretrained":
        if cfg.overrides:
            raise ModelLoadError("model.overrides change the architecture; they need model.init: random")
        source = get_preset(cfg.name).hub_id if cfg.name in PRESETS else cfg.name
        if source is None:
            raise ModelLoadError(f"preset {cfg.name!r} has no published weights to load (model.init pretrained, "
                                 "a LoRA's default): set model.name to a model folder or hub id (flux-prep "
                                 "tiny-model DIR writes a tiny one), or model.init random (with a LoRA, and "
                                 "lora.allow_random_base true)")
        model, part = split_transformer_path(source)
        return load_transformer(model, dtype=dtype, part=part)
    config = _random_init_config(cfg)
    cls = model_family(cfg).transformer_cls()
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device, _default_dtype(dtype):
        torch.manual_seed(seed)
        return cls(**config)


def _random_init_config(cfg: ModelConfig) -> dict:
    if cfg.name in PRESETS:
        return transformer_config(cfg.name, **cfg.overrides)
    model, part = split_transformer_path(cfg.name)
    try:
        config = dict(model_family(cfg).transformer_cls().load_config(model, **({"subfolder": part} if part else {})))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{cfg.name}: cannot read the transformer config: {str(e).splitlines()[0]}") from e
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    unknown = set(cfg.overrides) - set(config)
    if unknown:
        raise ModelLoadError(f"unknown transformer option(s): {', '.join(sorted(unknown))}")
    config.update(cfg.overrides)
    return config


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    """Build the weights in `dtype` from the start: a 12B model built in fp32 and then cast would
    need 48 GB for a moment."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def weights_dtype(cfg: TrainConfig) -> torch.dtype:
    """The dtype the model's weights are kept in: bf16 for LoRA's frozen base (the adapter is cast to
    fp32 by add_lora) and for model.weights_dtype bf16; else fp32."""
    return torch.bfloat16 if cfg.lora.rank > 0 or cfg.model.weights_dtype == "bf16" else torch.float32


def place(model, family: Family, device, quantize_base: str = "none", host_blocks=()) -> None:
    """Move the model to `device` one block at a time, quantizing each block as it arrives, so that
    weights loaded on the host never exist whole on the device in bf16 (and the family's large layers outside
    the blocks, family.quantize_outside, with them). Blocks whose index is in `host_blocks` stay where they
    are (the BlockOffloader takes them)."""
    for name, child in model.named_children():
        if name not in family.block_lists:
            child.to(device)
            if quantize_base != "none" and name in family.quantize_outside:
                quantize_block(child, quantize_base)
    for i, block in enumerate(family.blocks(model)):
        if i in host_blocks:
            continue
        block.to(device)
        if quantize_base != "none":
            quantize_block(block, quantize_base)


def convert_to_float8(model, family: Family) -> int:
    """Give the transformer's token-wise linear layers float8 matmuls (torchao's Float8Linear,
    dynamic tensorwise scales) and return how many. Weights, gradients and optimizer states stay
    fp32: only each matmul's inputs are scaled and cast to float8, output in bf16. The first and
    last layers and the per-sample modulation layers stay bf16 (`float8_layer`). Meant for
    H100-class GPUs with torch.compile, which fuses the scaling into the neighbouring kernels."""
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as e:
        raise ModelLoadError("run.precision fp8 needs torchao: pip install -e '.[fp8]'") from e
    count = sum(1 for n, m in model.named_modules() if float8_layer(family, n, m))
    if count == 0:
        raise ModelLoadError("run.precision fp8: no linear layer of this model has float8-aligned sizes")
    convert_to_float8_training(model, config=Float8LinearConfig(),
                               module_filter_fn=lambda m, fqn: float8_layer(family, fqn, m))
    return count


def use_flex_attention(model) -> None:
    """Run this model's attention through diffusers' "flex" backend (for BlockMask masks), leaving
    the process-wide default as it was: `set_attention_backend` also makes its backend the default
    of every other diffusers model in the process (a validation or benchmark model built later)."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry
    default = _AttentionBackendRegistry._active_backend
    model.set_attention_backend("flex")
    _AttentionBackendRegistry.set_active_backend(default)


def base_identity(cfg: ModelConfig, seed: int) -> dict:
    """What the run starts from, for flux_prep.json ("base") and the log: the source of its weights
    (a preset's hub id for a preset) and their hash, or the config a random init was built from."""
    if cfg.init == "pretrained":
        source = get_preset(cfg.name).hub_id if cfg.name in PRESETS else cfg.name
        return {"init": "pretrained", **transformer_identity(source)}
    return {"init": "random", "source": cfg.name, "seed": seed, "sha256": None}


def describe_base(base: dict) -> str:
    """The log line naming the base a run loaded."""
    if base["init"] == "pretrained":
        digest = f"sha256 {base['sha256'][:16]}" if base["sha256"] else "not hashed: not on this machine"
        return f"base model: pretrained weights of {base['source']} (transformer {digest})"
    return f"base model: random weights (seed {base['seed']}) of {base['source']}'s config (model.init random)"


def base_training_info(name: str) -> dict:
    """The flux_prep.json of the model `name` names, when a trainer wrote it (empty for published weights)."""
    model, part = split_transformer_path(name)
    return read_training_info(Path(model) / part if part else model) if Path(model).is_dir() else {}


def check_guidance(cfg: ModelConfig, model) -> None:
    """model.guidance feeds the guidance embedding: refuse a value that a model without one would drop."""
    if not model.config.guidance_embeds and cfg.guidance != ModelConfig.guidance:
        raise ModelLoadError(f"model.guidance {cfg.guidance} is fed to a guidance embedding, and {cfg.name} has none "
                             "(guidance_embeds false; guidance-distilled models such as flux-dev have one): remove "
                             "model.guidance, or train a model with guidance_embeds")


def text_mode_change(cfg: ModelConfig, family: Family, cache_mode: str, cache: str) -> str | None:
    """A warning when pretrained weights that a trainer trained on one text mode go on training on a cache of
    the other (the model is moved to the cache's convention, which flux_prep.json then records)."""
    trained = base_training_info(cfg.name).get("text_mode") if cfg.init == "pretrained" else None
    if trained is None or trained == cache_mode:
        return None
    return (f"{cfg.name} was trained on {trained} {family.text.label} text (its {TRAINING_INFO}), and the "
            f"training cache {cache} "
            f"holds {cache_mode} text: this run retrains it to {cache_mode}'s convention. To keep its own, "
            f"encode the cache with --text-mode {trained}")


def run_conventions(cfg, family: Family, guidance_embeds: bool) -> dict:
    """How the model being trained is sampled (flux_prep.json's schedule, the trainer's samples), by
    flux-sample's rule (shared/sampling.py): this run's guidance dropout and guidance value over the base's
    conventions: a preset's values, else what the model folder's trainer saved, else its published configs."""
    m = cfg.model
    run = {"guidance_dropout": cfg.flow.guidance_dropout, "guidance": m.guidance if guidance_embeds else None}
    if m.name in PRESETS:
        p = get_preset(m.name)
        return sampling_conventions(family, {"shift_schedule": p.shift_schedule, "default_steps": p.default_steps,
                                             **run}, guidance_embeds)
    model, part = split_transformer_path(m.name)
    index = model_index(model) if part else None
    return sampling_conventions(family, {**base_training_info(m.name), **run}, guidance_embeds, index,
                                _scheduler_config(model) if part else None)


def _scheduler_config(model: str) -> dict | None:
    """A model folder's (or a cached hub model's) scheduler config, None when it has none."""
    import json
    path = Path(model) / "scheduler" / "scheduler_config.json"
    if path.is_file():
        return json.loads(path.read_text())
    if Path(model).exists():
        return None
    try:
        from huggingface_hub import hf_hub_download
        return json.loads(Path(hf_hub_download(model, "scheduler_config.json", subfolder="scheduler")).read_text())
    except Exception:  # noqa: BLE001 -- offline or absent: the default schedule
        return None


def check_cache_fits(model, family: Family, reader) -> None:
    """Refuse a cache of another family, or whose tensor sizes do not match the transformer's input layers."""
    if reader.family is not family:
        raise ModelLoadError(f"the cache {reader.dir} holds {reader.family.name} encodings; the model is "
                             f"{family.name}: encode the images with this model's folder")
    # (the transformer's size, the cache's): its input channels take 2x2 patches of 4 x latent_channels,
    # joint_attention_dim the text states (t5_dim), pooled_projection_dim a pooled vector (clip_dim)
    misfits = family.misfits(model.config, reader.manifest["dims"])
    wrong = [f"{key}: the cache gives {given}, the transformer takes {have}" for key, (have, given) in misfits.items()
             if key != "out_channels"]
    if wrong:
        raise ModelLoadError("the cache does not fit the model: " + "; ".join(wrong))


def add_lora(model, cfg: LoraConfig, family: Family) -> None:
    """Freeze the model and add the adapter of lora.kind (peft's LoRA, DoRA, LoKr or LoHa: train/adapters.py) on
    `lora.targets` (default: the family's attention and MLP projections), its weights in fp32 whatever the
    base's dtype (diffusers' cast_training_params)."""
    from diffusers.training_utils import cast_training_params
    model.requires_grad_(False)
    with warnings.catch_warnings():   # peft, on a torchao base: merging would need the quantizer (never merged here)
        warnings.filterwarnings("ignore", message=".*get_apply_tensor_subclass.*")
        model.add_adapter(peft_config(cfg, lora_targets(cfg, family)))
    if not any(p.requires_grad for p in model.parameters()):
        raise ModelLoadError(f"LoRA targets matched no module: {lora_targets(cfg, family)}")
    cast_training_params(model, dtype=torch.float32)
    if cfg.kind == "lora" and not cfg.dora:
        keep_input_dtype(model)


def keep_input_dtype(model) -> None:
    """peft casts each LoRA layer's input to the adapter's dtype (fp32), and autocast, under which the trainer
    always runs a LoRA, casts it back to bf16 for the matmul: the same numbers, two more passes over every
    adapted layer's input. Turned off (peft's own switch), the layer computes the same, bit for bit."""
    from peft.tuners.lora import LoraLayer
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.cast_input_dtype_enabled = False


def check_family_options(cfg: TrainConfig, family: Family) -> None:
    """Refuse, before the model is built, an option this model family cannot honour, naming the key."""
    if cfg.flow.guidance_dropout_mode == "independent" and not family.text.pooled:
        raise ModelLoadError(f"flow.guidance_dropout_mode independent drops the text and the pooled vector with a coin "
                             f"each; {family.name} has no pooled vector: use joint")
    if cfg.data.expected_text_mode and cfg.data.expected_text_mode not in family.text.modes:
        raise ModelLoadError(f"data.expected_text_mode {cfg.data.expected_text_mode}: {family.name} text is "
                             f"{' or '.join(family.text.modes)} only")


def lora_targets(cfg: LoraConfig, family: Family) -> str:
    """lora.targets, or the family's attention and MLP projections where it is left empty."""
    return cfg.targets or family.default_lora_targets


def load_lora_state_dict(model, state: dict) -> None:
    from peft.utils import set_peft_model_state_dict
    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ModelLoadError(f"checkpoint adapter has unexpected keys: {unexpected[:3]} (an adapter of another "
                             "lora.kind, lora.dora or lora.targets than this run's?)")


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP parameter (a DTensor; a view of its storage), or the tensor itself."""
    from torch.distributed.tensor import DTensor
    return t.to_local() if isinstance(t, DTensor) else t


class EMA:
    """Exponential moving average of the trainable parameters, kept in float32. Built from the parameters
    as they train (after accelerate's prepare): under FSDP these are sharded DTensors, and so is each
    shadow tensor, placed like its parameter (1/N of the memory on each of N ranks)."""

    def __init__(self, named_params: list[tuple[str, torch.nn.Parameter]], decay: float):
        self.decay = decay
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.shadow = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        # On the local shards: each rank averages its own, in place, with no communication.
        torch._foreach_lerp_([_local(s) for s in self.shadow], [_local(p.detach()).float() for p in self.params],
                             1.0 - self.decay)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": dict(zip(self.names, self.shadow))}

    def load_state_dict(self, state: dict) -> None:
        for i, name in enumerate(self.names):
            self.shadow[i].copy_(state["shadow"][name])

    def named_weights(self) -> dict:
        """{name: shadow tensor}: the tensors themselves (this rank's DTensors under FSDP), for
        torch.distributed.checkpoint to save and to load into in place."""
        return dict(zip(self.names, self.shadow))

    @contextlib.contextmanager
    @torch.no_grad()
    def applied(self):
        """The shadow weights in the model's parameters for the duration (sample images of the EMA), then
        the trained weights back, bit for bit; on each rank's own shards, with no communication."""
        saved = [_local(p.detach()).clone() for p in self.params]
        for p, s in zip(self.params, self.shadow):
            _local(p.detach()).copy_(_local(s))
        try:
            yield
        finally:
            for p, s in zip(self.params, saved):
                _local(p.detach()).copy_(s)

    def gathered(self, keep: bool) -> dict:
        """{name: whole shadow tensor in host memory} where `keep` (the main process), else {}. Under FSDP
        every rank must call it: each tensor is gathered in turn, in the same order on every rank, so at
        most one whole tensor exists on the device at a time."""
        from torch.distributed.tensor import DTensor
        out = {}
        for name, s in zip(self.names, self.shadow):
            whole = s.full_tensor() if isinstance(s, DTensor) else s
            if keep:
                out[name] = whole.cpu()
        return out
