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
