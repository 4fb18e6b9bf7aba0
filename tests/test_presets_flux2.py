"""The FLUX.2 presets: the real models' shapes (checked by parameter count on the meta device)."""
import pytest
import torch

from shared.presets import get_preset as get_flux2_preset   # one table for both families
from shared.presets import transformer_config as flux2_transformer_config
from shared.presets_flux2 import FLUX2_PRESETS


@pytest.mark.parametrize("name, blocks, width, heads, text_width, guidance, params_b", [
    ("flux2-klein-4b", (5, 20), 3072, 24, 7680, False, 3.88),
    ("flux2-klein-9b", (8, 24), 4096, 32, 12288, False, 9.08),
    ("flux2-dev", (8, 48), 6144, 48, 15360, True, 32.22),
])
def test_real_flux2_presets(name, blocks, width, heads, text_width, guidance, params_b):
    from diffusers import Flux2Transformer2DModel
    cfg = get_flux2_preset(name).transformer
    assert (cfg["num_layers"], cfg["num_single_layers"]) == blocks
    assert cfg["num_attention_heads"] * cfg["attention_head_dim"] == width and cfg["num_attention_heads"] == heads
    assert cfg["joint_attention_dim"] == text_width and cfg["guidance_embeds"] is guidance
    assert sum(cfg["axes_dims_rope"]) == cfg["attention_head_dim"]
    with torch.device("meta"):
        model = Flux2Transformer2DModel(**cfg)
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 2) == params_b


def test_flux2_preset_defaults_and_overrides():
    base = get_flux2_preset("flux2-klein-4b")
    assert (base.default_steps, base.guidance_scale, base.true_cfg) == (50, 4.0, True)
    assert base.hub_id == "black-forest-labs/FLUX.2-klein-base-4B"
    dev = get_flux2_preset("flux2-dev")
    assert dev.true_cfg is False and dev.text_layers == (10, 20, 30)
    assert flux2_transformer_config("flux2-dev", num_layers=2)["num_layers"] == 2
    with pytest.raises(ValueError, match="unknown transformer option"):
        flux2_transformer_config("flux2-tiny", hidden=3)
    with pytest.raises(ValueError, match="unknown model preset .flux2-pro."):
        get_flux2_preset("flux2-pro")
    assert set(FLUX2_PRESETS) >= {"flux2-klein-4b", "flux2-klein-9b", "flux2-dev", "flux2-tiny"}
