"""Sample images during training: prompts encoded into the cache by `flux-prep encode --sample-prompts`,
rendered by the trainer with the sampler's loop, equal to flux-sample's images from final/ (CPU, tiny)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from preprocess.cli import app as prep_app
from sample.cli import app as sample_app
from shared.cache import read_manifest
from shared.image_files import read_png_text
from train.loop import Trainer

PROMPTS = ["a red circle on a black background", "a blue square on a white background"]


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory):
    """The tiny model folder with bf16-representable transformer weights (as published FLUX weights are),
    so that LoRA's bf16 base is exactly the weights flux-sample reads."""
    from shared.tiny import write_tiny_model
    folder = write_tiny_model(tmp_path_factory.mktemp("tiny_bf16") / "model", seed=0)
    for f in (folder / "transformer").glob("*.safetensors"):
        save_file({k: v.to(torch.bfloat16).float() for k, v in load_file(f).items()}, str(f), metadata={"format": "pt"})
    return folder


def _encode(*args):
    return CliRunner().invoke(prep_app, ["encode", *map(str, args)])


@pytest.fixture(scope="module")
def cache(bf16_model, tmp_path_factory):
    """16 demo images encoded with the sample prompts, in one run."""
    from preprocess.demo import write_demo_shards
    root = tmp_path_factory.mktemp("sample_cache")
    write_demo_shards(root / "raw", num_samples=16, size=32, samples_per_shard=16)
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n\n")
    r = _encode("--model", bf16_model, "--input", root / "raw", "--output", root / "cache", "--resolution", 32,
                "--t5-mode", "trimmed", "--t5-max-length", 32, "--dtype", "fp32", "--num-workers", 0,
                "--device", "cpu", "--no-progress", "--rows-per-shard", 4, "--sample-prompts", root / "prompts.txt")
    assert r.exit_code == 0, r.output
    return root / "cache"


def _config(tmp_path, cache, model, **overrides):
    from train.config import load_config
    base = {"data.train_cache": str(cache), "data.batch_size": 4, "data.num_workers": 0, "data.shuffle_buffer": 8,
            "model.name": str(model), "run.output_dir": str(tmp_path / "run"), "run.max_steps": 4,
            "run.precision": "no", "run.log_every": 2, "run.tensorboard": False, "run.progress": False,
            "optim.lr": 1e-2, "flow.guidance_dropout": 0.2, "run.sample_every": 2, "run.sample_steps": 3,
            "run.sample_seeds": [0, 5]}
    base.update(overrides)
    return load_config(None, base)


def _flux_sample(out, model, *args):
    r = CliRunner().invoke(sample_app, ["--model", str(model), *map(str, args), "--prompt", PROMPTS[1],
                                        "--seed", 5, "--steps", 3, "--output", str(out), "--no-progress"])
    assert r.exit_code == 0, r.output
    return np.asarray(Image.open(next(out.glob("0000-*.png"))))


def test_sample_prompts_in_the_cache(cache):
    manifest = read_manifest(cache)
    assert manifest["sample_prompts"] == "sample_prompts.safetensors"
    tensors = load_file(cache / "sample_prompts.safetensors")
    assert tensors["t5"].dtype == torch.float32 and tensors["t5"].shape[0] == len(PROMPTS)
    assert tensors["t5_len"].tolist()[0] < 32   # trimmed: the real tokens only
    assert tensors["clip"].shape == (2, 64) and tensors["empty_clip"].shape == (64,)


def test_full_weights_last_sample_is_flux_sample_from_final(tmp_path, cache, bf16_model):
    Trainer(_config(tmp_path, cache, bf16_model)).train()
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step-2", "step-4"]
    pngs = sorted((run / "samples/step-4").glob("0*.png"))
    assert len(pngs) == 4 and (run / "samples/step-4/grid.png").is_file()
    meta = read_png_text(pngs[1])
    assert (meta["prompt"], meta["seed"], meta["step"]) == (PROMPTS[0], "5", "4")
    ours = np.asarray(Image.open(run / "samples/step-4/0001-a-blue-square-on-a-white-background-seed5.png"))
    theirs = _flux_sample(tmp_path / "fs", bf16_model, "--transformer", run / "final")
    assert np.array_equal(ours, theirs)
    # the model learns between samples: step 2's images are not step 4's
    early = np.asarray(Image.open(run / "samples/step-2/0001-a-blue-square-on-a-white-background-seed5.png"))
    assert not np.array_equal(early, ours)


def test_lora_last_sample_is_flux_sample_with_the_adapter(tmp_path, cache, bf16_model):
    cfg = _config(tmp_path, cache, bf16_model, **{"lora.rank": 4, "model.init": "pretrained",
                                                  "run.precision": "bf16", "optim.lr": 5e-2})
    Trainer(cfg).train()
    run = tmp_path / "run"
    ours = np.asarray(Image.open(run / "samples/step-4/0001-a-blue-square-on-a-white-background-seed5.png"))
    theirs = _flux_sample(tmp_path / "fs", bf16_model, "--lora", run / "final")
    base = _flux_sample(tmp_path / "base", bf16_model)
    assert np.array_equal(ours, theirs)
    assert not np.array_equal(ours, base)   # the adapter is in the sample


IN_PLACE = {"int8 base": {"model.quantize_base": "int8"}, "float8 compute": {"run.precision": "fp8"},
            "blocks swapped": {"run.offload_blocks": 2, "run.grad_checkpointing": True}}


@pytest.mark.parametrize("case", list(IN_PLACE))
def test_lora_on_a_base_without_a_bf16_copy_renders_in_place_close_to_flux_sample(case, tmp_path, cache, bf16_model):
    """A quantized, float8 or swapped base: the samples come from the training model, the adapter unmerged
    (train/samples.renders_in_place); flux-sample's image from final/ (bf16 base, adapter merged, fp32 on a
    CPU) differs only by the base's rounding, far less than the adapter changes it (measured: 4-6 levels of 255
    on average, against 39-42 for the adapter)."""
    if case == "float8 compute":
        pytest.importorskip("torchao.float8", reason="fp8 needs torchao (the dev extra installs it)")
    cfg = _config(tmp_path, cache, bf16_model, **{"lora.rank": 4, "model.init": "pretrained", "run.precision": "bf16",
                                                  "optim.lr": 5e-2, "run.sample_every": 4, "run.sample_seeds": [5],
                                                  **IN_PLACE[case]})
    Trainer(cfg).train()
    run = tmp_path / "run"
    ours = np.asarray(Image.open(run / "samples/step-4/0001-a-blue-square-on-a-white-background-seed5.png"))
    theirs = _flux_sample(tmp_path / "fs", bf16_model, "--lora", run / "final")
    base = _flux_sample(tmp_path / "base", bf16_model, "--width", 32, "--height", 32)
    off = lambda a, b: np.abs(a.astype(int) - b.astype(int)).mean()  # noqa: E731
    assert off(ours, theirs) < off(theirs, base) / 4, (off(ours, theirs), off(theirs, base))


def test_ema_samples_are_the_ema_weights(tmp_path, cache, bf16_model):
    Trainer(_config(tmp_path, cache, bf16_model, **{"ema.decay": 0.5, "run.sample_every": 4})).train()
    run = tmp_path / "run"
    name = "0001-a-blue-square-on-a-white-background-seed5.png"
    ema = np.asarray(Image.open(run / "samples/step-4/ema" / name))
    assert read_png_text(run / "samples/step-4/ema" / name)["ema"] == "true"
    assert np.array_equal(ema, _flux_sample(tmp_path / "fs", bf16_model, "--transformer", run / "final/ema"))
    assert not np.array_equal(ema, np.asarray(Image.open(run / "samples/step-4" / name)))


def test_sampling_off_loads_no_vae(tmp_path, cache, bf16_model, monkeypatch):
    import train.samples
    calls = []
    monkeypatch.setattr(train.samples, "load_vae", lambda *a, **k: calls.append(a))
    Trainer(_config(tmp_path, cache, bf16_model, **{"run.sample_every": 0, "run.max_steps": 2})).train()
    assert calls == [] and not (tmp_path / "run/samples").exists()


def test_sample_prompts_alone_on_an_existing_cache_and_refusals(tmp_path, cache, bf16_model):
    import shutil
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    before = load_file(copy / "sample_prompts.safetensors")
    (copy / "sample_prompts.safetensors").unlink()
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest.pop("sample_prompts")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS))
    r = _encode("--model", bf16_model, "--output", copy, "--sample-prompts", prompts, "--device", "cpu")
    assert r.exit_code == 0, r.output
    after = load_file(copy / "sample_prompts.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)   # alone == together with encode
    assert read_manifest(copy)["sample_prompts"] == "sample_prompts.safetensors"
    for extra, message in ((["--t5-mode", "padded"], "T5 mode is 'trimmed'"), (["--t5-max-length", 16], "length is 32")):
        r = _encode("--model", bf16_model, "--output", copy, "--sample-prompts", prompts, "--device", "cpu", *extra)
        assert r.exit_code == 2 and message in r.output, r.output
    (tmp_path / "empty.txt").write_text("\n \n")
    r = _encode("--model", bf16_model, "--output", copy, "--sample-prompts", tmp_path / "empty.txt")
    assert r.exit_code == 2 and "no prompts (the file is empty)" in r.output, r.output
    r = _encode("--model", bf16_model, "--output", copy)
    assert r.exit_code == 2 and "--input is required" in r.output


def test_a_cache_without_sample_prompts_is_refused_at_start(tmp_path, bf16_model):
    from train_caches import write_cache

    from shared.cache import CacheError
    plain = write_cache(tmp_path / "plain", 8)
    with pytest.raises(CacheError, match="no sample prompts; encode them with flux-prep encode --sample-prompts"):
        Trainer(_config(tmp_path, plain, bf16_model))


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_processes_render_their_shares_and_finish(tmp_path, cache, bf16_model, fsdp):
    """2 CPU processes under DDP or FSDP2, each rendering half of the images (under FSDP with as many
    forwards each, every forward gathering the shards): the run ends (no deadlock) and the main process
    writes every image, the last step's equal to flux-sample's from final/."""
    from train_launcher import launch, write_config
    config = write_config(tmp_path, cache, settings={"model.name": str(bf16_model), "run.sample_every": 2,
                                                     "run.sample_steps": 3, "run.sample_seeds": [0, 5]})
    run = launch(config, processes=2, fsdp=fsdp, **{"run.max_steps": 4})
    names = sorted(p.name for p in (run / "samples/step-4").glob("0*.png"))
    assert len(names) == 4 and (run / "samples/step-2/grid.png").is_file()
    ours = np.asarray(Image.open(run / "samples/step-4/0001-a-blue-square-on-a-white-background-seed5.png"))
    assert np.array_equal(ours, _flux_sample(tmp_path / "fs", bf16_model, "--transformer", run / "final"))
