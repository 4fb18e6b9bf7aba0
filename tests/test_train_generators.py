"""The noise generators in checkpoints: one per DataLoader worker, refused for another worker count,
and the one generator of a checkpoint written before there was one per worker still resumes."""
import pytest
from safetensors.torch import load_file, save_file
from train_caches import read_metrics, tiny_config, write_cache

from train.loop import train


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_cache(tmp_path_factory.mktemp("gen") / "c", 16, rows_per_shard=8, row_group_rows=2)


def losses(run_dir) -> list:
    return [(m["step"], m["loss"]) for m in read_metrics(run_dir) if "loss" in m]


def test_resume_with_another_worker_count_is_refused(tmp_path, cache):
    settings = {"run.max_steps": 2, "run.checkpoint_every": 2, "data.num_workers": 0, "data.batch_size": 2}
    train(tiny_config(tmp_path, cache, **settings))
    assert set(load_file(tmp_path / "run/checkpoints/step-2/rank0.safetensors")) == {"worker0"}
    with pytest.raises(ValueError, match=r"step-2 holds the noise generators of 1 DataLoader worker\(s\) per process, "
                                         r"this run has 2; set data.num_workers"):
        train(tiny_config(tmp_path, cache, **{**settings, "data.num_workers": 2, "run.resume": "auto",
                                              "run.max_steps": 3}))


def test_checkpoint_with_the_single_generator_of_before_resumes_exactly(tmp_path, cache):
    settings = {"run.max_steps": 3, "run.checkpoint_every": 2, "data.num_workers": 0, "data.batch_size": 2}
    train(tiny_config(tmp_path / "full", cache, **settings))
    train(tiny_config(tmp_path / "cut", cache, **settings), stop_after_step=2)
    path = tmp_path / "cut/run/checkpoints/step-2/rank0.safetensors"
    save_file({"state": load_file(path)["worker0"]}, path)   # the layout written before
    train(tiny_config(tmp_path / "cut", cache, **{**settings, "run.resume": "auto"}))
    assert losses(tmp_path / "cut/run") == losses(tmp_path / "full/run") and len(losses(tmp_path / "full/run")) == 3
