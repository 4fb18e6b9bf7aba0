"""`flux-prep lora merge` and `lora extract`, tested by sampling on the tiny folders of both families: the merged
transformer (a folder, or a BFL file) gives `flux-sample --lora`'s image; the adapter extracted at full rank
gives the fine-tune's image; the reported error is ||dW - BA|| / ||dW|| of the adapter as diffusers reads it."""
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from preprocess.cli import app as prep_app
from sample.cli import app as sample_app

PROMPT, SIZE, STEPS = "a red circle on a blue background", 32, 2
INFO = {"text_mode": "padded", "text_max_length": 32, "default_steps": STEPS, "guidance_dropout": 0.0}
FAMILIES = [("tiny_model", "flux1"), ("tiny_flux2_klein", "flux2")]


def invoke(app, *args, ok=True):
    r = CliRunner().invoke(app, [str(a) for a in args])
    if ok:
        assert r.exit_code == 0, r.output
    return r


def flux_sample(out, model, *extra):
    invoke(sample_app, "--model", model, "--prompt", PROMPT, "--output", out, "--steps", STEPS, "--width", SIZE,
           "--height", SIZE, "--seed", 1, "--text-max-length", 32, "--cfg-scale", 1, "--no-progress", *extra)
    return np.asarray(Image.open(next(out.glob("0000-*.png"))).convert("RGB")).astype(np.int16)


def lora_final(model_dir, family, folder):
    """A LoRA final/ as the trainer writes it, every A and B random (a visible change)."""
    from peft import LoraConfig

    from shared.family import get_family, load_transformer
    from train.checkpoint import write_lora_adapter
    model = load_transformer(str(model_dir))
    model.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=get_family(family).default_lora_targets))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
    write_lora_adapter(model, {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}, folder)
    (folder / "flux_prep.json").write_text(json.dumps({**INFO, "family": family, "lora": {"rank": 4, "alpha": 8}}))
    return folder


def bfl_file(model_dir, family, path):
    """The base transformer as one file in BFL's layout, ComfyUI's prefix on its keys."""
    from shared.bfl import PREFIX
    from shared.family import get_family
    state = load_file(str(model_dir / "transformer" / "diffusion_pytorch_model.safetensors"))
    bfl = get_family(family).bfl().diffusers_to_bfl(state)
    save_file({PREFIX + k: v for k, v in bfl.items()}, str(path), metadata={"format": "pt"})
    return path


@pytest.mark.parametrize("fixture,family", FAMILIES)
def test_merged_model_gives_flux_samples_lora_image(fixture, family, request, tmp_path):
    model = request.getfixturevalue(fixture)
    final = lora_final(model, family, tmp_path / "final")
    base = flux_sample(tmp_path / "base", model)
    with_lora = flux_sample(tmp_path / "lora", model, "--lora", final)
    assert np.abs(with_lora - base).max() > 2   # the adapter changes the image

    invoke(prep_app, "lora", "merge", model, final, "--out", tmp_path / "merged")
    assert json.loads((tmp_path / "merged" / "flux_prep.json").read_text())["lora"] is None
    merged = flux_sample(tmp_path / "m", model, "--transformer", tmp_path / "merged")
    assert np.abs(merged - with_lora).max() <= 1

    file = bfl_file(model, family, tmp_path / "base.safetensors")
    invoke(prep_app, "lora", "merge", file, final, "--out", tmp_path / "merged.safetensors")
    assert np.abs(flux_sample(tmp_path / "b", model, "--transformer", tmp_path / "merged.safetensors")
                  - with_lora).max() <= 1

    # --scale: peft's own merge of the adapter with every layer's scaling halved (LoraLayer.scaling)
    invoke(prep_app, "lora", "merge", model, final, "--out", tmp_path / "half", "--scale", 0.5)
    half = load_file(str(tmp_path / "half" / "diffusion_pytorch_model.safetensors"))
    assert torch.allclose(half["transformer_blocks.0.attn.to_q.weight"], peft_merge(model, final, 0.5)
                          ["transformer_blocks.0.attn.to_q.weight"], atol=1e-6)


def peft_merge(model_dir, final, scale):
    """The base with the adapter merged by peft's LoraLayer.merge, each layer's scaling times `scale`."""
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer
    from peft.utils import set_peft_model_state_dict
    from safetensors import safe_open

    from shared.family import load_transformer
    with safe_open(str(final / "pytorch_lora_weights.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
        state = {k.removeprefix("transformer."): f.get_tensor(k) for k in f.keys()}
    config = {k.removeprefix("transformer."): v for k, v in meta.items()}
    model = load_transformer(str(model_dir))
    model.add_adapter(LoraConfig(r=config["r"], lora_alpha=config["lora_alpha"],
                                 target_modules=config["target_modules"]))
    assert not set_peft_model_state_dict(model, state).unexpected_keys
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    for m in layers.values():
        m.scaling = {k: v * scale for k, v in m.scaling.items()}
        m.merge()
    return {f"{name}.weight": m.base_layer.weight for name, m in layers.items()}


def fine_tune(model_dir, family, folder):
    """A full-weight 'fine-tune': every default LoRA layer's weight and bias moved by full-rank noise."""
    from shared.family import get_family, load_transformer
    model = load_transformer(str(model_dir))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and re.fullmatch(get_family(family).default_lora_targets, name):
                m.weight.add_(0.05 * torch.randn(m.weight.shape, generator=g))
                if m.bias is not None:
                    m.bias.add_(0.05 * torch.randn(m.bias.shape, generator=g))
    model.save_pretrained(str(folder))
    (folder / "flux_prep.json").write_text(json.dumps({**INFO, "family": family}))
    return folder


def reported_error(output: str) -> float:
    return float(re.search(r"([0-9.e-]+) overall", output).group(1))


@pytest.mark.parametrize("fixture,family", FAMILIES)
def test_extracted_adapter_of_full_rank_gives_the_fine_tunes_image(fixture, family, request, tmp_path):
    model = request.getfixturevalue(fixture)
    tuned = fine_tune(model, family, tmp_path / "tuned")
    full = invoke(prep_app, "lora", "extract", model, tuned, "--rank", 64, "--out", tmp_path / "full").output
    assert reported_error(full) < 1e-5
    want = flux_sample(tmp_path / "t", model, "--transformer", tuned)
    assert np.abs(want - flux_sample(tmp_path / "base", model)).max() > 2
    assert np.abs(flux_sample(tmp_path / "e", model, "--lora", tmp_path / "full") - want).max() <= 1

    low = invoke(prep_app, "lora", "extract", model, tuned, "--rank", 2, "--out", tmp_path / "low").output
    assert reported_error(low) > 0.1
    assert abs(reported_error(low) - diffusers_error(model, tuned, tmp_path / "low", family)) < 1e-3


def diffusers_error(model_dir, tuned, adapter, family):
    """||dW - s B A|| / ||dW|| over the LoRA's layers, the adapter as the family's pipeline reads it."""
    import diffusers

    from shared.family import get_family
    pipeline = getattr(diffusers, get_family(family).lora_pipeline)
    state, meta = pipeline.lora_state_dict(str(adapter), return_lora_metadata=True)
    meta = {k.removeprefix("transformer."): v for k, v in meta.items()}
    scale = meta["lora_alpha"] / meta["r"]
    base = load_file(str(model_dir / "transformer" / "diffusion_pytorch_model.safetensors"))
    new = load_file(str(tuned / "diffusion_pytorch_model.safetensors"))
    lost = total = 0.0
    for key in state:
        if key.endswith("lora_A.weight"):
            layer = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
            delta = new[f"{layer}.weight"] - base[f"{layer}.weight"]
            approx = scale * state[key.replace("lora_A", "lora_B")] @ state[key]
            lost += float(((delta - approx) ** 2).sum())
            total += float((delta ** 2).sum())
    return (lost / total) ** 0.5


def test_lora_tools_refuse_bad_input_naming_it(tiny_model, tiny_flux2_klein, tmp_path):
    final = lora_final(tiny_model, "flux1", tmp_path / "final")
    r = invoke(prep_app, "lora", "merge", tiny_flux2_klein, final, "--out", tmp_path / "x", ok=False)
    assert r.exit_code == 2 and "flux1 adapter" in r.output and not (tmp_path / "x").exists()
    r = invoke(prep_app, "lora", "extract", tiny_model, tiny_flux2_klein, "--rank", 4, "--out", tmp_path / "y",
               ok=False)
    assert r.exit_code == 2 and "flux2" in r.output and not (tmp_path / "y").exists()
    r = invoke(prep_app, "lora", "merge", tiny_model, tmp_path, "--out", tmp_path / "x", ok=False)
    assert r.exit_code == 2 and "no LoRA weights" in r.output
