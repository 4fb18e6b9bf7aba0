from pathlib import Path

import pytest
import torch

from shared.presets import PRESETS, get_preset, transformer_config


@pytest.mark.parametrize("name", ["flux-dev", "flux-schnell"])
def test_real_flux_dimensions(name):
    cfg = get_preset(name).transformer
    assert (cfg["num_layers"], cfg["num_single_layers"]) == (19, 38)
    assert cfg["num_attention_heads"] * cfg["attention_head_dim"] == 3072
    assert cfg["num_attention_heads"] == 24
    assert cfg["joint_attention_dim"] == 4096 and cfg["pooled_projection_dim"] == 768
    assert tuple(cfg["axes_dims_rope"]) == (16, 56, 56)
    assert cfg["guidance_embeds"] == (name == "flux-dev")


def test_flux_preset_has_12b_parameters():
    from diffusers import FluxTransformer2DModel
    with torch.device("meta"):
        model = FluxTransformer2DModel(**transformer_config("flux-schnell"))
    n = sum(p.numel() for p in model.parameters())
    assert 11.5e9 < n < 12.1e9


def test_tiny_builds_and_overrides():
    from diffusers import FluxTransformer2DModel
    model = FluxTransformer2DModel(**transformer_config("tiny"))
    assert sum(p.numel() for p in model.parameters()) < 2e6
    assert transformer_config("flux-dev", num_layers=4)["num_layers"] == 4
    with pytest.raises(ValueError, match="unknown transformer option"):
        transformer_config("tiny", hidden=3)
    with pytest.raises(ValueError, match="unknown model preset"):
        get_preset("flux-pro")
    assert set(PRESETS) >= {"flux-dev", "flux-schnell", "tiny"}


# The text length each published base was trained with, and so what FluxPipeline, ComfyUI and Forge feed it
# (diffusers' FluxPipeline: at most 256 for schnell; 512 for dev; FLUX.2: 512, Flux2KleinPipeline's).
PUBLISHED_T5_LENGTH = {"flux-schnell": 256, "flux-dev": 512, "flux-kontext-dev": 512, "flux2-klein-base-4b": 512}


@pytest.mark.parametrize("preset", sorted(p.name for p in (Path(__file__).parents[1] / "configs/params").glob("*.yaml")))
def test_every_preset_for_a_published_base_keeps_its_padded_t5(preset):
    """A model trained on trimmed T5 does not render in diffusers, ComfyUI or Forge (shared/render_tools.py):
    a preset for a published base encodes as that base was trained, so its outputs render everywhere."""
    from shared.params import read_yaml
    params = read_yaml((Path(__file__).parents[1] / "configs/params" / preset).read_text())
    base = Path(params["model"]["path"]).name
    assert base in PUBLISHED_T5_LENGTH, f"{preset}: model.path {base!r} is no published base this test knows"
    assert params["encode"]["text_mode"] == "padded", preset
    assert params["encode"]["text_max_length"] == PUBLISHED_T5_LENGTH[base], preset


@pytest.mark.parametrize("preset", ["kontext-lora.yaml", "flux2-klein-edit-lora.yaml"])
def test_edit_presets_encode_references_with_options_encode_takes(preset):
    """An edit preset's encode section stores a reference per sample, in keys `flux-prep encode` takes (as its
    --config reads them), and trains without samples during training (the cache's prompts carry no reference)."""
    import typer

    from preprocess.cli import app
    from shared.params import option_keys, read_yaml
    params = read_yaml((Path(__file__).parents[1] / "configs/params" / preset).read_text())
    encode = typer.main.get_command(app).commands["encode"]
    assert set(params["encode"]) <= set(option_keys(encode)), preset
    assert params["encode"]["references"] == 1 and not params["train"]["run"].get("sample_every")
