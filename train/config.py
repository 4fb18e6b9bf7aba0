"""The trainer's one config: a tree of dataclasses, read from YAML, overridden from the command line.

Command line: `--config FILE.yaml` then any number of `--section.key value` overrides, e.g.
`--optim.lr 1e-4 --run.max_steps 1000 --model.overrides '{num_layers: 4}'`. Values are read as
YAML and checked against the field's type (shared/params.py): a value of another type, a choice
outside a field's Literal or an unknown key is an error naming the key, before anything is built.
`--output-dir DIR` and `--resume auto|PATH` are short forms of `--run.output_dir` and `--run.resume`.
A YAML file whose top level has a `train:` key (DVC's params.yaml) is read from that section.
"""
from __future__ import annotations

import copy
import dataclasses
import textwrap
import typing
from dataclasses import dataclass, field
from typing import Literal

import yaml

from shared.params import ConfigError, build, choices, field_help, load_section, read_yaml, set_dotted

@dataclass
class DataConfig:
    # Cache folder (flux-prep encode's output), or its URL (s3://...). Or several caches mixed, each batch
    # drawn whole from one by weight (seeded: the same mix on every run and resume): [{cache: A, weight: 0.7},
    # {cache: B, weight: 0.3, loss_weight: 1.0}] (regularisation images, other resolutions or sources;
    # loss_weight scales that cache's loss). Encoded alike (family, encoders, text mode and length), else
    # refused. Needs run.max_steps (not run.epochs).
    train_cache: str | list = ""
    val_cache: str | None = None          # held-out cache for the validation loss
    # fsspec options for the caches' file system (endpoint, credentials; else from the environment:
    # AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...). Their values are never written to config.json or logs.
    storage_options: dict = field(default_factory=dict)
    expected_text_mode: Literal[None, "padded", "trimmed"] = None   # refuse a cache encoded otherwise (None: any)
    batch_size: int = 4                   # per process, per micro-step
    num_workers: int = 2                  # DataLoader workers per process
    shuffle_buffer: int = 256             # samples mixed across row groups
    prefetch_factor: int = 4              # batches each DataLoader worker holds ready (2 let a slow
    #                                       object store's stalls through: docs/BENCHMARKS.md)
    val_batch_size: int = 8               # per process, for the validation loss
    val_max_samples: int | None = None    # cap on validation samples (None: the whole cache)
    val_noise_cache_mb: int = 1024        # host memory per process for the fixed validation noise, drawn
    #                                       once and reused (32 bytes per latent value); past it, drawn each pass


@dataclass
class ModelConfig:
    name: str = "tiny"                    # preset (tiny, flux-schnell, flux-dev) or a model folder / hub id
    # pretrained: load the published (or a trained) model's weights; random: build from the preset/config
    # with fresh weights (seed run.seed); auto: pretrained for a LoRA (lora.rank > 0), random otherwise
    init: Literal["auto", "random", "pretrained"] = "auto"
    overrides: dict = field(default_factory=dict)   # transformer config changes, e.g. {num_layers: 4}
    guidance: float = 1.0                 # fed to the guidance embedding of guidance-distilled models
    # Full training: the dtype the trainable weights are kept in (bf16 halves their memory; the
    # optimizer rounds stochastically where it can). LoRA's frozen base is bf16 whatever this says.
    weights_dtype: Literal["fp32", "bf16"] = "fp32"
    # LoRA: the frozen base's blocks stored quantized (torchao; the adapter trains in fp32 on top)
    quantize_base: Literal["none", "float8", "int8", "nf4"] = "none"


@dataclass
class OptimConfig:
    # adamw (torch), adamw8bit (torchao), adafactor (transformers)
    name: Literal["adamw", "adamw8bit", "adafactor"] = "adamw"
    lr: float = 1e-4                      # peak learning rate (after the warmup)
    betas: tuple[float, float] = (0.9, 0.999)   # Adam's moment decays, e.g. [0.9, 0.95]
    weight_decay: float = 0.0             # decoupled (AdamW)
    eps: float = 1e-8                     # Adam's denominator term
    # AdamW: torch's fused kernel (None: where the device supports it). adafactor: true makes each parameter's
    # step one compiled function (train/adafactor.py: a few kernels instead of about 22; not yet measured on a
    # GPU, so None keeps transformers' eager step)
    fused: bool | None = None
    grad_clip: float = 1.0                # 0: no clipping
    # Step each parameter as soon as its gradient is complete, then free the gradient, so the
    # gradients of the whole model never exist at once (needs grad_clip 0, grad_accum 1, one process)
    in_backward: bool = False


@dataclass
class ScheduleConfig:
    kind: Literal["constant", "cosine"] = "constant"   # after the warmup
    warmup_steps: int = 0                 # linear warmup: step k (from 0) at lr * (k + 1) / warmup_steps
    min_lr_ratio: float = 0.0             # cosine floor, as a fraction of lr


@dataclass
class FlowConfig:
    # how each step draws t (0: data, 1: noise): uniform; logit_normal, sigmoid(N(logit_mean, logit_std)) as SD3;
    # flux_shift, uniform through FLUX's time shift for the image's size; sigmoid, sigmoid(sigmoid_scale * N(0, 1))
    # as kohya; shift, the sigmoid sampler's t through flow.shift's fixed shift; mode, SD3's mode sampling
    sampler: Literal["uniform", "logit_normal", "flux_shift", "sigmoid", "shift", "mode"] = "uniform"
    logit_mean: float = 0.0               # logit_normal: the mean of logit(t)
    logit_std: float = 1.0                # logit_normal: the std of logit(t)
    sigmoid_scale: float = 1.0            # sigmoid and shift: the std of logit(t) before the shift (kohya's)
    shift: float = 3.0                    # shift: t -> shift*t / (1 + (shift-1)*t) (> 1: towards noise; SD3's 3)
    mode_scale: float = 1.29              # mode: SD3's s, in [-1, 1.75] (> 0: more t mid-way; 0: uniform)
    # each sample's loss times a weight of its t (SD3's, as diffusers' compute_loss_weighting_for_sd3):
    # none; sigma_sqrt, 1/t^2 (t clamped at 1e-3); cosmap, 2 / (pi (1 - 2t + 2t^2)). The validation loss is unweighted
    loss_weighting: Literal["none", "sigma_sqrt", "cosmap"] = "none"
    # weight each latent value's error by the image's loss mask (a cache encoded with flux-prep encode --masks),
    # each sample's loss divided by its mask's mean: a full mask gives the plain loss
    masked_loss: bool = False
    guidance_dropout: float = 0.1         # p of replacing the text (FLUX.1: T5 + CLIP) by the empty prompt's
    # joint: one coin per sample drops the text and the pooled vector together (p of both); independent
    # (FLUX.1 only: FLUX.2 has no pooled vector): a coin each, as
    # torchtitan/MLPerf (p = 0.447 drops both about 20% of the time, each alone 25%)
    guidance_dropout_mode: Literal["joint", "independent"] = "joint"
    latent: Literal["mean", "sample"] = "mean"   # mean: the VAE posterior's mean; sample: mean + exp(logvar/2) * n,
    #                                       drawn each step (as torchtitan; needs a cache encoded with --store-logvar)
    # p of dropping all of a sample's reference images in a step (a cache with references: edit training),
    # so that the model also learns the prompt alone; a coin from the step's generator
    reference_dropout: float = 0.0


@dataclass
class LoraConfig:
    rank: int = 0                         # 0: full fine-tuning / training; >0: LoRA of this rank
    alpha: float | None = None            # None: alpha = rank
    # The adapter (peft's): lora (B A), lokr (LyCORIS LoKr: a Kronecker product w1 x w2, w2 of rank
    # lora.rank, a full matrix where lora.rank is at least half its size), loha (LyCORIS LoHa: a
    # Hadamard product of two rank-lora.rank products); each scaled by alpha / rank (train/adapters.py)
    kind: Literal["lora", "lokr", "loha"] = "lora"
    dora: bool = False                    # lora only: DoRA, a trained magnitude per output row (peft's use_dora)
    # lokr only: the size of w1's side (peft's decompose_factor); -1: as near the square root of each
    # layer's sizes as they factor
    lokr_factor: int = -1
    # regex of the module names to adapt (peft's full match); empty: the model family's attention and MLP
    # projections of both block kinds (shared/family/: FLUX.1's and FLUX.2's names differ)
    targets: str = ""
    # A LoRA is applied to the published weights it was trained on, so a LoRA on a randomly initialised
    # base (model.init random) is refused unless this is true (tests and benchmarks of the mechanics)
    allow_random_base: bool = False


@dataclass
class EmaConfig:
    decay: float = 0.0                    # 0: no EMA; else e.g. 0.999
    every: int = 1                        # update the EMA every this many optimizer steps


@dataclass
class RunConfig:
    output_dir: str = "runs/train"        # checkpoints/, final/, metrics.jsonl, logs (a local folder)
    max_steps: int | None = None          # optimizer steps; None: from epochs
    epochs: float | None = None           # used when max_steps is None
    grad_accum: int = 1                   # micro-steps per optimizer step
    # bf16: autocast; fp8: bf16 autocast plus float8 matmuls in the blocks' linear layers (torchao,
    # `pip install -e .[fp8]`; for H100-class GPUs, with compile); with LoRA, fp8 stores the frozen
    # base's token-wise layers in float8 once and computes them in float8, the adapter in fp32 on top
    # (not with model.quantize_base, lora.dora, run.offload_blocks); no: fp32; auto:
    # bf16 on CUDA and for LoRA (its base is bf16), fp32 elsewhere (bf16 autocast on a CPU ran 4.5x slower)
    precision: Literal["auto", "bf16", "fp8", "no"] = "auto"
    grad_checkpointing: bool = False      # recompute each block's activations in the backward
    # Keep this many transformer blocks' weights in (pinned) host memory, each copied to the GPU just
    # ahead of its use (frozen weights for LoRA; all of a block's weights with optim.in_backward).
    # Needs grad_checkpointing. On a CPU the copies go between host buffers (for tests).
    offload_blocks: int = 0
    # Keep what the forward saves for the backward (with grad_checkpointing: each block's input tokens)
    # in pinned host memory until the backward needs it: 3.2 GiB less for FLUX.2 [dev] at 1024px, at the
    # cost of a copy out and back per block (train/activations.py)
    offload_activations: bool = False
    compile: bool = False                 # torch.compile each repeated block (not with model.quantize_base yet)
    # How trimmed text's padding is masked in attention: sdpa (a boolean mask; PyTorch picks the
    # memory-efficient kernel), flex (flex attention skipping padded blocks; CUDA), or auto (flex on
    # CUDA with compile, else sdpa)
    masked_attention: Literal["auto", "sdpa", "flex"] = "auto"
    cudnn_sdpa: bool = False              # cuDNN attention: its backward crashed under autocast with Flux (torch 2.11)
    seed: int = 0                         # weights' init, data order, noise, timesteps
    log_every: int = 10                   # optimizer steps per metrics.jsonl record
    val_every: int = 0                    # 0: validate only at the end
    checkpoint_every: int = 0             # 0: no intermediate checkpoints
    keep_checkpoints: int = 2             # the newest this many checkpoints are kept
    resume: str | None = None             # auto (latest in output_dir) or a checkpoint folder
    # Where the metrics also go, through accelerate's trackers: tensorboard, wandb, mlflow (a list for
    # several) or none (metrics.jsonl alone). Their files go under output_dir/logs (wandb's offline
    # runs too, with WANDB_MODE=offline; mlflow's store unless MLFLOW_TRACKING_URI names another).
    log_with: list | str = field(default_factory=lambda: ["tensorboard"])
    tensorboard: bool | None = None       # the old key: false drops tensorboard from run.log_with, true adds it
    progress: bool = True                 # progress bars (false: none, the libraries' loading bars included)
    deterministic: bool = False           # torch.use_deterministic_algorithms (CPU tests)
    save_final: bool = True               # write final/ (benchmarks turn it off)
    record_keys: bool = False             # audit: write seen/rank{r}.json (keys consumed, weights hash)
    # Sample images (train/samples.py) of the cache's sample prompts (flux-prep encode --sample-prompts)
    # every N steps and at the last, to output_dir/samples/step-N/ and the tracker; 0: off (nothing loaded)
    sample_every: int = 0
    sample_steps: int | None = None       # denoising steps (None: the model's default, as flux-sample)
    sample_seeds: list = field(default_factory=lambda: [0])   # one image per prompt and seed
    sample_size: int | None = None        # pixels, square, a multiple of 16 (None: the cache's resolution)
    sample_vae: str | None = None         # FLUX folder / hub id whose VAE decodes them (None: model.name)


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        """The config as it is recorded (config.json, logs): data.storage_options' values left out,
        since they may hold credentials."""
        out = dataclasses.asdict(self)
        out["data"]["storage_options"] = {k: NOT_RECORDED for k in out["data"]["storage_options"]}
        return out


NOT_RECORDED = "<not recorded>"


ALIASES = {"output-dir": "run.output_dir", "output_dir": "run.output_dir", "resume": "run.resume"}


def _section_types() -> dict[str, type]:
    return {f.name: typing.get_type_hints(TrainConfig)[f.name] for f in dataclasses.fields(TrainConfig)}


# The closed choices, as the Literal fields above declare them (for --help).
CHOICES = {(section, key): allowed for section, cls in _section_types().items()
           for key, tp in typing.get_type_hints(cls).items() if (allowed := choices(tp)) is not None}


def load_yaml(path) -> dict:
    """A trainer config file's tree: a pipeline's params.yaml is read from its `train` section
    (`train` is no section of the trainer's config, so a file that has one is a params.yaml)."""
    return load_section(path, "train")


def parse_overrides(argv: list[str]) -> list[tuple[str, object]]:
    """['--a.b', 'v', '--c.d=w'] -> [('a.b', 'v'), ('c.d', 'w')], each value read as YAML (--config's
    is a path, kept as it is)."""
    pairs, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --section.key value")
        name = arg[2:]
        if "=" in name:
            name, value = name.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(argv):
                raise ConfigError(f"--{name} needs a value")
            value = argv[i + 1]
            i += 2
        pairs.append((name, value if name == "config" else _read_value(name, value)))
    return pairs


def _read_value(name: str, text: str):
    try:
        return read_yaml(text)
    except yaml.YAMLError:
        raise ConfigError(f"--{name}: cannot read {text!r} as YAML") from None


def _merge(tree: dict, overrides) -> dict:
    """The YAML tree with the `section.key` overrides set in it (short forms expanded)."""
    tree = copy.deepcopy(tree)
    for name, value in (overrides.items() if isinstance(overrides, dict) else (overrides or [])):
        dotted = ALIASES.get(name, name).replace("-", "_")
        if "." not in dotted:
            raise ConfigError(f"unknown option --{dotted}; options are --section.key (sections: "
                              f"{', '.join(_section_types())})")
        set_dotted(tree, dotted, value)
    return tree


def load_config(config_path=None, overrides: list[tuple[str, object]] | dict | None = None) -> TrainConfig:
    """The config of YAML file `config_path` (or the defaults) with `overrides` ({'run.max_steps': 10}
    or parse_overrides' pairs) applied, every value checked; a ConfigError naming a bad key."""
    tree = _merge(load_yaml(config_path) if config_path is not None else {}, overrides)
    cfg = build(TrainConfig, tree)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    if not cfg.data.train_cache:
        raise ConfigError("data.train_cache is not set")
    from .mix import parse_sources   # here: mix.py imports the data stream, which imports this module
    if len(parse_sources(cfg.data.train_cache)) > 1 and cfg.run.epochs is not None:
        raise ConfigError("run.epochs counts passes over one cache; with several data.train_cache sources "
                          "(each turning over at its own pace) set run.max_steps instead")
    if "://" in cfg.run.output_dir:
        raise ConfigError(f"run.output_dir {cfg.run.output_dir!r}: the trainer writes to a local folder (only "
                          "caches may be remote)")
    if cfg.run.precision == "auto":
        cfg.run.precision = auto_precision(cfg.lora.rank > 0)
    if cfg.run.max_steps is None and cfg.run.epochs is None:
        raise ConfigError("set run.max_steps or run.epochs")
    if cfg.data.batch_size < 1 or cfg.run.grad_accum < 1:
        raise ConfigError("data.batch_size and run.grad_accum must be at least 1")
    if cfg.data.val_noise_cache_mb < 0:
        raise ConfigError("data.val_noise_cache_mb must be at least 0 (0: draw the noise on each pass)")
    if not 0.0 <= cfg.flow.guidance_dropout <= 1.0:
        raise ConfigError("flow.guidance_dropout is a probability in [0, 1]")
    validate_timesteps(cfg.flow)
    if not 0.0 <= cfg.flow.reference_dropout <= 1.0:
        raise ConfigError("flow.reference_dropout is a probability in [0, 1]")
    cfg.run.log_with = chosen_trackers(cfg.run)
    from .memory_checks import validate_memory_options   # here: it reads this module's types
    validate_memory_options(cfg)
    validate_base(cfg)
    from .adapters import validate_adapter   # here: adapters.py reads this module's types
    validate_adapter(cfg)


def validate_timesteps(flow: FlowConfig) -> None:
    """Refuse timestep settings that would draw t outside [0, 1], naming the key."""
    from shared.schedules import MODE_SCALE_RANGE
    if flow.shift <= 0:
        raise ConfigError(f"flow.shift must be > 0 (1: no shift), not {flow.shift}")
    lo, hi = MODE_SCALE_RANGE
    if not lo <= flow.mode_scale <= hi:
        raise ConfigError(f"flow.mode_scale {flow.mode_scale} is outside [{lo}, {hi:.4f}], where SD3's mode "
                          "sampler stops mapping [0, 1] onto itself")


TRACKERS = ("tensorboard", "wandb", "mlflow")


def chosen_trackers(run: RunConfig) -> list[str]:
    """run.log_with as the list of trackers to start ([] for none), the old run.tensorboard applied."""
    given = [run.log_with] if isinstance(run.log_with, str) else run.log_with   # one name: a list of one
    names = ["none" if n is None else str(n) for n in given]
    for name in names:
        if name not in TRACKERS + ("none",):
            raise ConfigError(f"run.log_with: {name!r} is not one of {' | '.join(TRACKERS + ('none',))}")
    if "none" in names and len(names) > 1:
        raise ConfigError(f"run.log_with: none cannot be combined with other trackers ({', '.join(names)})")
    chosen = [n for n in dict.fromkeys(names) if n != "none"]
    if run.tensorboard is False and "tensorboard" in chosen:
        chosen.remove("tensorboard")
    if run.tensorboard and "tensorboard" not in chosen:
        chosen.append("tensorboard")
    return chosen


def auto_precision(lora: bool) -> str:
    """run.precision auto: bf16 where it is fast (CUDA) and for LoRA (its frozen base is bf16), else fp32."""
    import torch
    return "bf16" if lora or torch.cuda.is_available() else "no"


def validate_base(cfg: TrainConfig) -> None:
    """Resolve model.init auto and refuse a LoRA on a randomly initialised base, naming the keys: such an
    adapter learns to correct random weights, not the model flux-sample --lora applies it to. (A preset
    without published weights is refused where the model is built: dvc.yaml passes model.name.)"""
    model, rank = cfg.model, cfg.lora.rank
    if model.init == "auto":
        model.init = "pretrained" if rank > 0 else "random"
    if rank > 0 and model.init == "random" and not cfg.lora.allow_random_base:
        raise ConfigError(f"lora.rank {rank} with model.init random trains the adapter on a randomly initialised "
                          "base, not on the weights it will be applied to: leave model.init at auto (pretrained "
                          "for a LoRA), or set lora.allow_random_base true to mean it")


def help_text() -> str:
    lines = [__doc__.strip(), "", "Options (default):"]
    for sec, cls in _section_types().items():
        section, helps = cls(), field_help(cls)
        for f in dataclasses.fields(cls):
            shown = "<regex>" if f.name == "targets" else repr(getattr(section, f.name))
            allowed = CHOICES.get((sec, f.name))
            if allowed:
                shown += "   (" + " | ".join(str(c) for c in allowed) + ")"
            lines.append(f"  --{sec}.{f.name} {shown}")
            if helps.get(f.name):
                lines.extend("        " + part for part in textwrap.wrap(helps[f.name], 92))
    return "\n".join(lines)
