"""run.log_with: the metrics reach TensorBoard and wandb (offline) as metrics.jsonl holds them."""
import pytest
from train_caches import read_metrics, tiny_config, write_cache

from train.config import ConfigError, parse_overrides
from train.loop import train


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("caches")
    return write_cache(root / "train", 8), write_cache(root / "val", 4, seed=9, prefix="val")


def tracked_run(tmp_path, caches, log_with) -> list[dict]:
    cfg = tiny_config(tmp_path, *caches, **{"run.max_steps": 3, "run.val_every": 2, "run.tensorboard": None,
                                            "run.log_with": log_with})
    train(cfg)
    return read_metrics(tmp_path / "run")


def by_step(records: list[dict], key: str) -> dict:
    return {r["step"]: r[key] for r in records if key in r}


def test_tensorboard_event_file_holds_the_metrics(tmp_path, caches):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    records = tracked_run(tmp_path, caches, "tensorboard")
    events = sorted((tmp_path / "run/logs").rglob("events.out.tfevents.*"))
    scalars = {}
    for path in events:
        acc = EventAccumulator(str(path))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    for key in ("loss", "lr", "val/loss"):
        expected = by_step(records, key)
        assert expected and scalars[key] == pytest.approx(expected, rel=1e-6), key
    assert set(by_step(records, "val/loss")) == {0, 2, 3}
    assert not (tmp_path / "run/logs/wandb").exists()


def test_wandb_offline_run_holds_the_metrics_and_config(tmp_path, caches, monkeypatch):
    pytest.importorskip("wandb")
    from wandb_offline import config, history
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    records = tracked_run(tmp_path, caches, ["wandb", "tensorboard"])
    files = list((tmp_path / "run/logs/wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    rows = history(files[0])
    for key in ("loss", "lr", "grad_norm", "val/loss"):
        logged = {r["_step"]: r[key] for r in rows if key in r}
        assert logged == pytest.approx(by_step(records, key), rel=1e-9), key
    assert config(files[0])["optim.lr"] == pytest.approx(1e-3)
    assert list((tmp_path / "run/logs").rglob("events.out.tfevents.*"))   # both trackers ran


def test_log_with_none_writes_no_logs(tmp_path, caches):
    records = tracked_run(tmp_path, caches, "none")
    assert by_step(records, "loss") and not (tmp_path / "run/logs").exists()


def test_log_with_choices_and_the_old_tensorboard_key(tmp_path, caches):
    def chosen(**overrides):
        return tiny_config(tmp_path, *caches, **{"run.tensorboard": None, **overrides}).run.log_with
    assert chosen() == ["tensorboard"]
    assert chosen(**{"run.log_with": "wandb"}) == ["wandb"]
    assert chosen(**{"run.log_with": ["tensorboard", "mlflow"], "run.tensorboard": False}) == ["mlflow"]
    assert chosen(**{"run.log_with": "none", "run.tensorboard": True}) == ["tensorboard"]
    with pytest.raises(ConfigError, match="run.log_with: 'comet' is not one of tensorboard | wandb | mlflow"):
        chosen(**{"run.log_with": "comet"})
    with pytest.raises(ConfigError, match="none cannot be combined"):
        chosen(**{"run.log_with": ["none", "wandb"]})
    # on the command line a list is written as YAML, which parse_overrides reads as a list
    assert chosen(**dict(parse_overrides(["--run.log_with", "[wandb, tensorboard]"]))) == ["wandb", "tensorboard"]


def test_a_tracker_that_is_not_installed_is_refused_by_name(tmp_path, caches):
    import importlib.util
    if importlib.util.find_spec("mlflow") is not None:
        pytest.skip("mlflow is installed here")
    cfg = tiny_config(tmp_path, *caches, **{"run.log_with": "mlflow", "run.tensorboard": None})
    with pytest.raises(ConfigError, match=r"run.log_with mlflow: not installed \(pip install -e '.\[mlflow\]'"):
        train(cfg)
    assert not (tmp_path / "run").exists()
