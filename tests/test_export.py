"""A trained model where other tools load it: the trainer's LoRA final/ in diffusers' FluxPipeline as it is,
and `flux-prep export` (kohya / Black Forest Labs layouts for ComfyUI and Forge, diffusers' layout, bf16 and
fp8), checked against diffusers' own loaders and converters, and flux-sample."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from preprocess.cli import app as flux_prep_app
from sample.cli import app as flux_sample_app
from train.checkpoint import write_lora_adapter
from shared.family.flux1 import FLUX1

DEFAULT_LORA_TARGETS = FLUX1.default_lora_targets

PROMPT, SEED = "a red circle on a blue background", 1
INFO = {"t5_mode": "padded", "t5_max_length": 32, "default_steps": 2, "guidance_dropout": 0.0}
# diffusers' kohya reader splits the single blocks' fused linear1 at FLUX.1's widths (3072, 12288), so the
# tiny model's LoRA that goes through it leaves linear1 out (the full-width test below covers it).
KOHYA_TINY_TARGETS = (r"transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj"
                      r"|to_add_out)|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2))"
                      r"|single_transformer_blocks\.\d+\.proj_out")


def run(app, *args):
    return CliRunner().invoke(app, [str(a) for a in args])


def lora_model(tiny_model, targets):
    from peft import LoraConfig

    from shared.family import load_transformer
    model = load_transformer(str(tiny_model))
    model.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():   # every A and B its own values, small enough for a picture that is not saturated
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
    return model


def lora_final(tiny_model, folder, targets=DEFAULT_LORA_TARGETS, old=False):
    """A LoRA final/ as the trainer writes it (`old`: as it wrote it before FluxPipeline's prefix)."""
    model = lora_model(tiny_model, targets)
    if old:
        model.save_lora_adapter(str(folder))
    else:
        write_lora_adapter(model, {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}, folder)
    (folder / "flux_prep.json").write_text(json.dumps({**INFO, "lora": {"rank": 4, "alpha": 8}}))
    return folder


def flux_sample_pixels(tiny_model, out, *args):
    r = run(flux_sample_app, "--model", tiny_model, *args, "--prompt", PROMPT, "--seed", SEED, "--steps", 2,
            "--width", 32, "--height", 32, "--no-progress", "--output", out)
    assert r.exit_code == 0, r.output
    return np.asarray(Image.open(next(out.glob("0000-*.png"))).convert("RGB")).astype(np.int16)


def pipeline_pixels(tiny_model, lora=None, **load):
    from diffusers import FluxPipeline
    pipe = FluxPipeline.from_pretrained(str(tiny_model))
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(str(lora), **load)
    image = pipe(PROMPT, height=32, width=32, num_inference_steps=2, max_sequence_length=32, output_type="np",
                 generator=torch.Generator("cpu").manual_seed(SEED)).images[0]
    return np.round(image * 255).astype(np.int16)


@pytest.fixture(scope="module")
def base_pixels(tiny_model):
    return pipeline_pixels(tiny_model)


def test_flux_pipeline_loads_the_trainers_lora_final_as_flux_sample_applies_it(tiny_model, base_pixels, tmp_path):
    final = lora_final(tiny_model, tmp_path / "final")
    ours = flux_sample_pixels(tiny_model, tmp_path / "out", "--lora", final)
    theirs = pipeline_pixels(tiny_model, final)
    assert np.abs(theirs - base_pixels).max() > 2   # the adapter was loaded
    assert np.abs(ours - theirs).max() <= 1


@pytest.mark.parametrize("fmt", ["comfyui", "diffusers"])
def test_exported_lora_loads_in_flux_pipeline_like_flux_sample(fmt, tiny_model, base_pixels, tmp_path):
    """comfyui: kohya's names, read by diffusers' kohya converter; diffusers: an old final/ given the prefix."""
    final = lora_final(tiny_model, tmp_path / "final", KOHYA_TINY_TARGETS, old=fmt == "diffusers")
    out = tmp_path / ("lora.safetensors" if fmt == "comfyui" else "lora")
    r = run(flux_prep_app, "export", final, "--format", fmt, "--output", out)
    assert r.exit_code == 0, r.output
    ours = flux_sample_pixels(tiny_model, tmp_path / "out", "--lora", final)
    theirs = pipeline_pixels(tiny_model, out)
    assert np.abs(theirs - base_pixels).max() > 2
    assert np.abs(ours - theirs).max() <= 1
    if fmt == "comfyui":
        with safe_open(str(out), "pt") as f:
            keys, meta = set(f.keys()), f.metadata()
        assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys
        assert "lora_unet_single_blocks_1_linear2.alpha" in keys
        assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "8"
        assert meta["modelspec.architecture"] == "flux-1-schnell/lora"


def flux1_adapter(targets, rank=2):
    """A random peft adapter (no prefix) on FLUX.1-dev's real layer sizes; the model itself on the meta device."""
    import re

    from diffusers import FluxTransformer2DModel

    from shared.presets import transformer_config
    with torch.device("meta"):
        model = FluxTransformer2DModel(**transformer_config("flux-dev"))
    g = torch.Generator().manual_seed(0)
    adapter = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and re.fullmatch(targets, name):
            adapter[f"{name}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=g)
            adapter[f"{name}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=g)
    return adapter


@pytest.mark.parametrize("targets", [DEFAULT_LORA_TARGETS, r".*attn\.(to_q|to_v)"])
def test_kohya_layout_converts_back_exactly_at_flux1_width(targets):
    """Every tensor of the adapter comes back from diffusers' kohya reader; parts of a fused projection
    that had no adapter (to_k here) come back as zeros."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    from shared.bfl_lora import peft_to_kohya
    rank, alpha = 2, 4.0   # alpha / rank = 2: kohya's scale, which diffusers folds into A
    adapter = flux1_adapter(targets, rank)
    back = _convert_kohya_flux_lora_to_diffusers(peft_to_kohya(adapter, rank, alpha))
    back = {k.removeprefix("transformer."): v for k, v in back.items()}
    for k, v in adapter.items():
        assert torch.equal(back[k], v * 2 if ".lora_A." in k else v), k
    extra = set(back) - set(adapter)
    assert all(torch.count_nonzero(back[k]) == 0 for k in extra)
    assert ("transformer_blocks.0.attn.to_k.lora_B.weight" in extra) == ("to_k" not in targets)


def full_final(tiny_model, folder):
    import shutil
    shutil.copytree(tiny_model / "transformer", folder)
    (folder / "flux_prep.json").write_text(json.dumps(INFO))
    return folder


def flux_sample_weights(tiny_model, transformer) -> dict:
    """The weights flux-sample's --transformer loads (fp32)."""
    from sample.resolve import resolve_transformer
    from shared.family.flux1 import FLUX1
    from sample.run import load_sampling_transformer
    source = resolve_transformer(FLUX1, str(tiny_model), str(transformer))
    return load_sampling_transformer(source, None, torch.float32, "cpu").state_dict()


@pytest.mark.parametrize("dtype", [None, "bf16", "fp8"])
def test_full_weights_as_one_bfl_file(dtype, tiny_model, tmp_path):
    final = full_final(tiny_model, tmp_path / "final")
    out = tmp_path / "flux-tiny.safetensors"
    r = run(flux_prep_app, "export", final, "--format", "bfl", "--output", out, *(["--dtype", dtype] if dtype else []))
    assert r.exit_code == 0, r.output
    trained = load_file(final / "diffusion_pytorch_model.safetensors")
    stored = load_file(out)
    assert "double_blocks.0.img_attn.qkv.weight" in stored and "single_blocks.1.linear1.weight" in stored
    kinds = {v.dtype for v in stored.values()}
    assert kinds == {None: {torch.float32}, "bf16": {torch.bfloat16},
                     "fp8": {torch.bfloat16, torch.float8_e4m3fn}}[dtype]
    loaded = flux_sample_weights(tiny_model, out)
    for k, v in trained.items():
        if dtype == "fp8" and v.ndim == 2:
            v = v.to(torch.float8_e4m3fn)
        elif dtype:
            v = v.to(torch.bfloat16)
        assert torch.equal(loaded[k], v.float()), k
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt" and meta["modelspec.architecture"] == "flux-1-schnell"
    assert json.loads(meta["flux_prep"])["text_max_length"] == 32


def test_bfl_layout_is_what_diffusers_single_file_converter_reads_at_flux1_width():
    """diffusers' from_single_file converts a BFL file with FLUX.1's width written into its code (it cannot
    read the tiny model's), so its converter is checked at that width: on a FLUX.1-dev state dict with one
    block of each kind, every tensor a window of one random buffer (no 2 GB of weights), it gives what
    our converter gives, and ours maps its output back to the same BFL tensors."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    from shared.bfl import bfl_to_diffusers, diffusers_to_bfl
    from shared.presets import transformer_config
    with torch.device("meta"):
        model = FluxTransformer2DModel(**transformer_config("flux-dev", num_layers=1, num_single_layers=1))
    target = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    meta_bfl = diffusers_to_bfl({k: torch.empty(s, device="meta") for k, s in target.items()})
    buffer = torch.randn(max(v.numel() for v in meta_bfl.values()) + 4096, generator=torch.Generator().manual_seed(0),
                         dtype=torch.bfloat16)
    bfl = {k: buffer[i:i + v.numel()].view(v.shape) for i, (k, v) in enumerate(meta_bfl.items())}
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    ours = bfl_to_diffusers(bfl, target)
    assert set(theirs) == set(ours) == set(target)
    assert all(torch.equal(theirs[k], ours[k]) for k in ours)
    again = diffusers_to_bfl(theirs)
    assert all(torch.equal(again[k], v) for k, v in bfl.items())


def test_full_weights_in_diffusers_layout(tiny_model, tmp_path):
    from diffusers import FluxTransformer2DModel
    final = full_final(tiny_model, tmp_path / "final")
    out = tmp_path / "exported"
    r = run(flux_prep_app, "export", final, "--format", "diffusers", "--output", out, "--dtype", "bf16")
    assert r.exit_code == 0, r.output
    loaded = FluxTransformer2DModel.from_pretrained(str(out), torch_dtype=torch.bfloat16).state_dict()
    trained = load_file(final / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(loaded[k], v.to(torch.bfloat16)) for k, v in trained.items())
    assert json.loads((out / "flux_prep.json").read_text()) == INFO


def _lora(t, tiny_model):
    return lora_final(tiny_model, t / "final")


BAD = {
    "not a final": (lambda t, m: m / "transformer", ["--format", "bfl"], "flux.safetensors",
                    "not a trainer final/ folder (no flux_prep.json)"),
    "no such folder": (lambda t, m: t / "nope", ["--format", "bfl"], "flux.safetensors", "no such folder"),
    "fp8 LoRA": (_lora, ["--format", "comfyui", "--dtype", "fp8"], "lora.safetensors", "--dtype fp8 is for full"),
    "file without suffix": (lambda t, m: full_final(m, t / "final"), ["--format", "bfl"], "flux", "*.safetensors"),
    "unknown format": (lambda t, m: full_final(m, t / "final"), ["--format", "ckpt"], "flux.safetensors",
                       "unknown format 'ckpt'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_export_one_line_error_nothing_written(case, tiny_model, tmp_path):
    make, args, name, expected = BAD[case]
    final = make(tmp_path, tiny_model)
    r = run(flux_prep_app, "export", final, *args, "--output", tmp_path / "out" / name)
    assert r.exit_code == 2 and r.output.strip().startswith("error:") and expected in r.output, r.output
    assert not (tmp_path / "out").exists()


def test_existing_output_refused_unless_overwrite(tiny_model, tmp_path):
    final = full_final(tiny_model, tmp_path / "final")
    out = tmp_path / "flux.safetensors"
    out.write_bytes(b"keep")
    r = run(flux_prep_app, "export", final, "--format", "comfyui", "--output", out)
    assert r.exit_code == 2 and "exists; pass --overwrite" in r.output and out.read_bytes() == b"keep"
    r = run(flux_prep_app, "export", final, "--format", "comfyui", "--output", out, "--overwrite")
    assert r.exit_code == 0, r.output
    assert "img_in.weight" in load_file(out) and not list(tmp_path.glob(".*tmp"))


@pytest.mark.parametrize("fmt,name", [("comfyui", "flux.safetensors"), ("diffusers", "exported")])
def test_a_trimmed_t5_model_is_exported_with_a_warning_that_other_tools_cannot_render_it(fmt, name, tiny_model,
                                                                                         tmp_path):
    """FluxPipeline, ComfyUI and Forge pad T5 without a mask: a model trained on trimmed T5 draws noise there.
    The export is written (the file is right) and the warning names the tools and the way out; a padded
    model's export says nothing more than "wrote"."""
    padded = full_final(tiny_model, tmp_path / "padded")
    r = run(flux_prep_app, "export", padded, "--format", fmt, "--output", tmp_path / "p" / name)
    assert r.exit_code == 0 and "warning" not in r.output, r.output
    trimmed = full_final(tiny_model, tmp_path / "trimmed")
    (trimmed / "flux_prep.json").write_text(json.dumps({**INFO, "t5_mode": "trimmed"}))
    r = run(flux_prep_app, "export", trimmed, "--format", fmt, "--output", tmp_path / "t" / name)
    assert r.exit_code == 0 and (tmp_path / "t" / name).exists(), r.output
    said = " ".join(r.stderr.split())
    assert said.startswith(f"{tmp_path / 't' / name}: warning: trained on trimmed T5"), said
    assert "FluxPipeline, ComfyUI and Forge pad T5 without a mask" in said and "flux-sample" in said
