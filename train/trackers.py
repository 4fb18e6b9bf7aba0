"""Where the metrics go besides metrics.jsonl: accelerate's trackers, as run.log_with names them.

Each tracker writes under the run's logs folder: TensorBoard's event files, wandb's run folder
(`logs/wandb/`; offline with WANDB_MODE=offline) and, unless MLFLOW_TRACKING_URI says otherwise,
mlflow's store (`logs/mlruns/`)."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .config import ConfigError, TrainConfig

PROJECT = "flux-train"
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def check_installed(names: list[str]) -> None:
    """Refuse a tracker whose package is missing (accelerate would drop it without a word)."""
    missing = [n for n in names if importlib.util.find_spec(PACKAGES[n]) is None]
    if missing:
        extras = ",".join(missing)
        raise ConfigError(f"run.log_with {', '.join(missing)}: not installed (pip install -e '.[{extras}]', "
                          "or another run.log_with)")


def start_trackers(accelerator, cfg: TrainConfig, logs: Path) -> None:
    """Open the trackers (every process calls this; accelerate starts them on the main one)."""
    names = cfg.run.log_with
    if not names:
        return
    kwargs = {}
    if accelerator.is_main_process:
        logs.mkdir(parents=True, exist_ok=True)
    if "wandb" in names:
        kwargs["wandb"] = {"dir": str(logs)}
    if "mlflow" in names and accelerator.is_main_process and not os.environ.get("MLFLOW_TRACKING_URI"):
        import mlflow
        mlflow.set_tracking_uri((logs / "mlruns").resolve().as_uri())
    accelerator.init_trackers(PROJECT, config=flat_hparams(cfg), init_kwargs=kwargs)


def flat_hparams(cfg: TrainConfig) -> dict:
    """The config as `section.key` scalars and strings: what TensorBoard's hparams take."""
    out = {}
    for section, values in cfg.to_dict().items():
        for k, v in values.items():
            if isinstance(v, (int, float, str, bool)):
                out[f"{section}.{k}"] = v
    return out
