"""flux-sample end to end on the tiny model: PNGs with metadata, the trainer's conventions, BFL single
files, LoRA adapters, and bad input refused with one line, a non-zero exit and nothing written."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from sample.cli import app
from shared.family.flux1 import FLUX1
from shared.image_files import GRID_NAME, INDEX_NAME, read_png_text

PROMPT = "a red circle on a blue background"
FAST = ["--steps", "2", "--width", "32", "--height", "32", "--no-progress"]


def flux_sample(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


@pytest.fixture(scope="module")
def base_images(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("base") / "out"
    r = flux_sample("--model", tiny_model, "--prompt", PROMPT, "--prompt", "a green square", "--seed", 1,
                    "--seed", 2, "--output", out, "--grid", *FAST)
    assert r.exit_code == 0, r.output
    return out


def test_pngs_with_metadata_grid_and_index(base_images, tiny_model):
    pngs = sorted(base_images.glob("0*.png"))
    assert len(pngs) == 4
    meta = read_png_text(pngs[0])
    assert meta["prompt"] == PROMPT and meta["seed"] == "1" and meta["steps"] == "2"
    assert meta["model"] == str(tiny_model) and meta["transformer"].endswith("transformer")
    assert meta["cfg_scale"] == "1.0" and meta["guidance"] == "null" and meta["t5_mode"] == "padded"
    assert Image.open(base_images / GRID_NAME).size == (2 * 32, 2 * 32)
    index = json.loads((base_images / INDEX_NAME).read_text())["samples"]
    assert [e["file"] for e in index] == [p.name for p in pngs]
    assert not list(base_images.glob(".*tmp"))
    umask = os.umask(0)
    os.umask(umask)
    assert all(p.stat().st_mode & 0o777 == 0o666 & ~umask for p in [*pngs, base_images / INDEX_NAME])
    assert np.abs(pixels(pngs[0]) - pixels(pngs[1])).max() > 0   # seeds differ


def test_batching_does_not_change_images(base_images, tiny_model, tmp_path):
    r = flux_sample("--model", tiny_model, "--prompt", PROMPT, "--prompt", "a green square", "--seed", 1,
                    "--seed", 2, "--output", tmp_path, "--batch-size", 3, *FAST)
    assert r.exit_code == 0, r.output
    for p in base_images.glob("0*.png"):
        assert np.abs(pixels(p) - pixels(tmp_path / p.name)).max() <= 1, p.name


def test_trainer_final_folder_conventions(tiny_model, tmp_path):
    final = tmp_path / "final"
    shutil.copytree(tiny_model / "transformer", final)
    (final / "flux_prep.json").write_text(json.dumps(
        {"t5_mode": "trimmed", "t5_max_length": 16, "default_steps": 3, "shift_schedule": False,
         "guidance_dropout": 0.1}))
    r = flux_sample("--model", tiny_model, "--transformer", final, "--prompt", PROMPT, "--output", tmp_path / "o",
                    "--width", 32, "--height", 32, "--no-progress")
    assert r.exit_code == 0, r.output
    meta = read_png_text(next((tmp_path / "o").glob("*.png")))
    assert (meta["t5_mode"], meta["t5_max_length"], meta["steps"]) == ("trimmed", "16", "3")
    assert meta["shift_schedule"] == "false" and float(meta["cfg_scale"]) > 1


def test_bfl_single_file_gives_the_same_image(base_images, tiny_model, tmp_path):
    from safetensors.torch import load_file, save_file

    from shared.bfl import diffusers_to_bfl
    state = load_file(str(tiny_model / "transformer" / "diffusion_pytorch_model.safetensors"))
    bfl = diffusers_to_bfl(state)
    assert "double_blocks.0.img_attn.qkv.weight" in bfl and "single_blocks.1.linear1.weight" in bfl
    save_file(bfl, str(tmp_path / "flux1-tiny.safetensors"))
    r = flux_sample("--model", tiny_model, "--transformer", tmp_path / "flux1-tiny.safetensors", "--prompt", PROMPT,
                    "--seed", 1, "--output", tmp_path / "o", *FAST)
    assert r.exit_code == 0, r.output
    name = next(base_images.glob("0000-*seed1.png")).name
    assert np.array_equal(pixels(tmp_path / "o" / name), pixels(base_images / name))


def test_bfl_round_trip_with_comfy_prefix(tiny_guidance_state):
    from shared.bfl import PREFIX, bfl_to_diffusers, config_from_shapes, diffusers_to_bfl
    bfl = {PREFIX + k: v for k, v in diffusers_to_bfl(tiny_guidance_state).items()}
    cfg = config_from_shapes({k: tuple(v.shape) for k, v in bfl.items()})
    assert cfg["guidance_embeds"] and cfg["num_layers"] == 2 and cfg["attention_head_dim"] == 16
    back = bfl_to_diffusers(bfl, {k: tuple(v.shape) for k, v in tiny_guidance_state.items()})
    assert back.keys() == tiny_guidance_state.keys()
    assert all(torch.equal(back[k], v) for k, v in tiny_guidance_state.items())


@pytest.fixture
def tiny_guidance_state():
    from diffusers import FluxTransformer2DModel

    from shared.presets import transformer_config
    torch.manual_seed(0)
    return FluxTransformer2DModel(**transformer_config("tiny", guidance_embeds=True)).state_dict()


def test_lora_adapter_changes_output(base_images, tiny_model, tmp_path):
    from peft import LoraConfig, get_peft_model

    from shared.family import load_transformer
    base = load_transformer(str(tiny_model))
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    peft_model = get_peft_model(base, cfg)
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    r = flux_sample("--model", tiny_model, "--lora", tmp_path / "adapter", "--prompt", PROMPT, "--seed", 1,
                    "--output", tmp_path / "o", *FAST)
    assert r.exit_code == 0, r.output
    name = next(base_images.glob("0000-*seed1.png")).name
    assert np.abs(pixels(tmp_path / "o" / name) - pixels(base_images / name)).max() > 2

    # The merged transformer flux-sample uses computes what the peft-wrapped one computes.
    from sample.resolve import resolve_lora, resolve_transformer
    from sample.run import load_sampling_transformer
    lora, _ = resolve_lora(str(tmp_path / "adapter"))
    source = resolve_transformer(FLUX1, str(tiny_model), None)
    merged = load_sampling_transformer(source, lora, torch.float32, "cpu")
    g = torch.Generator().manual_seed(0)
    args = dict(hidden_states=torch.randn(1, 16, 64, generator=g),
                encoder_hidden_states=torch.randn(1, 8, 64, generator=g),
                pooled_projections=torch.randn(1, 64, generator=g), timestep=torch.tensor([0.5]),
                img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3), return_dict=False)
    with torch.no_grad():
        assert torch.allclose(merged(**args)[0], peft_model(**args)[0], atol=1e-5)


def test_trainer_lora_final_folder(base_images, tiny_model, tmp_path):
    """The trainer's LoRA final/: diffusers' save_lora_adapter file plus flux_prep.json."""
    from peft import LoraConfig

    from shared.family import load_transformer
    from shared.run_files import TRAINING_INFO
    model = load_transformer(str(tiny_model))
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v", "proj_mlp"],
                                 init_lora_weights=False))
    final = tmp_path / "final"
    model.save_lora_adapter(str(final))
    (final / TRAINING_INFO).write_text(json.dumps({"t5_mode": "padded", "t5_max_length": 32, "default_steps": 2,
                                                   "guidance_dropout": 0.0, "lora": {"rank": 4}}))
    r = flux_sample("--model", tiny_model, "--transformer", final, "--prompt", PROMPT, "--output", tmp_path / "x",
                    "--no-progress")
    assert r.exit_code == 2 and "pass it with --lora" in r.output
    r = flux_sample("--model", tiny_model, "--lora", final, "--prompt", PROMPT, "--seed", 1, "--output",
                    tmp_path / "o", *FAST)
    assert r.exit_code == 0, r.output
    name = next(base_images.glob("0000-*seed1.png")).name
    assert np.abs(pixels(tmp_path / "o" / name) - pixels(base_images / name)).max() > 2


def _transformer_folder(tmp_path, **overrides):
    from diffusers import FluxTransformer2DModel

    from shared.presets import transformer_config
    out = tmp_path / "bad_transformer"
    FluxTransformer2DModel(**transformer_config("tiny", **overrides)).save_pretrained(out)
    return out


BAD = {
    "unknown model": (lambda m, t: ["--model", t / "nope"], "no such folder"),
    "unknown transformer": (lambda m, t: ["--model", m, "--transformer", t / "nope"], "no such transformer"),
    "pickled transformer": (lambda m, t: ["--model", m, "--transformer", _touch(t / "model.ckpt")], "pickled"),
    "pickle-only folder": (lambda m, t: ["--model", m, "--transformer", _pickle_only(m, t)], "pickled"),
    "not a BFL file": (lambda m, t: ["--model", m, "--transformer",
                                     m / "vae" / "diffusion_pytorch_model.safetensors"], "Black Forest Labs"),
    "VAE misfit": (lambda m, t: ["--model", m, "--transformer", _transformer_folder(t, in_channels=32)],
                   "latent channels"),
    "T5 misfit": (lambda m, t: ["--model", m, "--transformer", _transformer_folder(t, joint_attention_dim=32)],
                  "T5"),
    "CLIP misfit": (lambda m, t: ["--model", m, "--transformer", _transformer_folder(t, pooled_projection_dim=32)],
                    "CLIP"),
    "width not /16": (lambda m, t: ["--model", m, "--width", 40], "multiples of 16"),
    "empty prompts file": (lambda m, t: ["--model", m, "--prompts-file", _touch(t / "prompts.txt")], "empty"),
    "unknown lora": (lambda m, t: ["--model", m, "--lora", t / "nope"], "LoRA"),
    "pickled lora": (lambda m, t: ["--model", m, "--lora", _pickle_lora(t)], "pickled"),
    "unknown device": (lambda m, t: ["--model", m, "--device", "gpu"], "unknown device 'gpu'"),
}


def _touch(path):
    path.write_text("")
    return path


def _pickle_only(model, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(model / "transformer" / "config.json", folder)
    torch.save({}, folder / "diffusion_pytorch_model.bin")
    return folder


def _pickle_lora(tmp_path):
    folder = tmp_path / "lora"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    torch.save({}, folder / "adapter_model.bin")
    return folder


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_one_line_error_nothing_written(case, tiny_model, tmp_path):
    make_args, expected = BAD[case]
    args = make_args(tiny_model, tmp_path)
    if "--prompts-file" not in args:
        args += ["--prompt", PROMPT]
    out = tmp_path / "out"
    r = flux_sample(*args, "--output", out, "--steps", 2, "--no-progress")
    assert r.exit_code not in (0, None), r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith("flux-sample: error:")]
    assert len(lines) == 1 and expected in lines[0], r.output
    assert not out.exists()


def test_config_gives_the_options_and_a_flag_overrides_it(base_images, tiny_model, tmp_path):
    """--config FILE's sample section gives flux-sample's options (keys are the options' names: output,
    not the function's output_dir); a flag beside it wins. The images are base_images' (the same
    prompts, seeds and steps given as flags)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPT}\na green square\n")
    out = tmp_path / "out"
    params = tmp_path / "params.yaml"
    params.write_text(f"encode: {{resolution: 7}}\nsample:\n  output: {out}\n  prompts_file: {prompts}\n"
                      "  seed: [1, 2]\n  steps: 9\n  width: 32\n  height: 32\n  grid: true\n  progress: false\n")
    r = flux_sample("--model", tiny_model, "--config", params, "--steps", 2)
    assert r.exit_code == 0, r.output
    pngs = sorted(p.name for p in base_images.glob("0*.png"))
    assert sorted(p.name for p in out.glob("0*.png")) == pngs and (out / GRID_NAME).is_file()
    assert read_png_text(out / pngs[0])["steps"] == "2"
    for name in pngs:
        assert np.array_equal(pixels(out / name), pixels(base_images / name)), name


@pytest.mark.parametrize("section, message", [
    ("trained: lora", r"params.yaml: unknown key 'trained' in the sample section; flux-sample takes attention_backend"),
    ("output_dir: x", r"unknown key 'output_dir'"),
    ("num_seeds: two", r"params.yaml: sample.num_seeds: .*integer"),
    ("seed: [[1]]", r"sample.seed: not a single value"),
    ("dtype: float", r"sample.dtype: .*'float' is not one of 'auto', 'bf16'"),
])
def test_a_bad_config_key_or_value_is_refused_naming_the_file_and_key(tiny_model, tmp_path, section, message):
    import re
    params = tmp_path / "params.yaml"
    params.write_text(f"sample:\n  {section}\n")
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["--model", str(tiny_model), "--prompt", PROMPT, "--output", str(out),
                                 "--config", str(params)], prog_name="flux-sample")
    assert r.exit_code == 2, r.output
    assert re.search(message, " ".join(r.output.replace("│", " ").split())), r.output
    assert not out.exists()


def test_device_and_dtype_auto(monkeypatch):
    from sample.resolve import SampleError
    from sample.run import _device_dtype
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _device_dtype("auto", "auto") == (torch.device("cpu"), torch.float32)
    assert _device_dtype("cpu", "bf16") == (torch.device("cpu"), torch.bfloat16)
    with pytest.raises(SampleError, match="'cuda' asked for, but no CUDA GPU is available"):
        _device_dtype("cuda", "auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert _device_dtype("auto", "auto") == (torch.device("cuda", 0), torch.bfloat16)
    assert _device_dtype("cuda", "float16") == (torch.device("cuda", 0), torch.float16)


def test_console_script_reports_errors(tmp_path):
    r = subprocess.run([sys.executable, "-m", "sample", "--model", str(tmp_path / "nope"), "--prompt", "x",
                        "--output", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "flux-sample: error:" in r.stderr and "Traceback" not in r.stderr
