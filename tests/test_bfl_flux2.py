"""FLUX.2 in Black Forest Labs' layout (shared/bfl_flux2.py) and its LoRAs in kohya's names
(shared/bfl_flux2_lora.py), checked against diffusers' own converters and loaders on the tiny FLUX.2
folders, and against the real models' shapes on the meta device."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from shared import bfl_flux2
from shared.bfl_flux2_lora import peft_to_kohya

# shared/family/flux2.py's default_lora_targets (branch flux2-family): the trainer's FLUX.2 targets
FLUX2_TARGETS = (
    r"(?:.*\.)?transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj"
    r"|to_add_out)|ff\.(linear_in|linear_out)|ff_context\.(linear_in|linear_out))"
    r"|(?:.*\.)?single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out)"
)
RANK, ALPHA = 4, 8.0   # alpha / rank = 2: kohya's scale, which diffusers' reader folds into A


def transformer_state(folder) -> tuple[dict, dict]:
    """(state dict, config) of a tiny FLUX.2 folder's transformer."""
    part = folder / "transformer"
    return load_file(str(part / "diffusion_pytorch_model.safetensors")), json.loads((part / "config.json").read_text())


def shapes(state: dict) -> dict:
    return {k: tuple(v.shape) for k, v in state.items()}


def model_inputs(config: dict, seed: int = 0) -> dict:
    """A 4x4-token image and 8 text tokens, with the ids the FLUX.2 pipelines give them."""
    g = torch.Generator().manual_seed(seed)
    img_ids = torch.zeros(16, 4)
    img_ids[:, 1], img_ids[:, 2] = torch.arange(16) // 4, torch.arange(16) % 4
    txt_ids = torch.zeros(8, 4)
    txt_ids[:, 3] = torch.arange(8)
    guidance = torch.tensor([4.0]) if config["guidance_embeds"] else None
    return dict(hidden_states=torch.randn(1, 16, config["in_channels"], generator=g),
                encoder_hidden_states=torch.randn(1, 8, config["joint_attention_dim"], generator=g),
                timestep=torch.tensor([0.7]), img_ids=img_ids, txt_ids=txt_ids, guidance=guidance, return_dict=False)


@pytest.fixture(params=["tiny_flux2_klein", "tiny_flux2_dev"])
def tiny_flux2(request):
    return request.getfixturevalue(request.param)


def test_bfl_layout_round_trips_and_is_what_diffusers_converter_reads(tiny_flux2):
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers
    state, config = transformer_state(tiny_flux2)
    bfl = bfl_flux2.diffusers_to_bfl(state)
    assert ("guidance_in.in_layer.weight" in bfl) == config["guidance_embeds"]
    assert bfl_flux2.is_flux2_bfl(bfl)
    for back in (bfl_flux2.bfl_to_diffusers(bfl), bfl_flux2.bfl_to_diffusers(bfl, shapes(state)),
                 convert_flux2_transformer_checkpoint_to_diffusers(dict(bfl))):   # diffusers' pops its input
        assert back.keys() == state.keys()
        for k, v in state.items():
            assert torch.equal(back[k], v), k


def test_config_from_shapes_makes_a_model_that_loads_the_state_strictly(tiny_flux2):
    """Read from the shapes alone (no base), the config is the folder's; the model built from it holds the
    BFL file's weights and computes as the folder's transformer."""
    from diffusers import Flux2Transformer2DModel
    state, config = transformer_state(tiny_flux2)
    bfl = bfl_flux2.diffusers_to_bfl(state)
    derived = bfl_flux2.config_from_shapes(shapes(bfl))
    assert derived == {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in derived}
    assert bfl_flux2.config_from_diffusers_shapes(shapes(state)) == derived
    model = bfl_flux2.transformer_from_state(derived, bfl_flux2.bfl_to_diffusers(bfl))
    original = Flux2Transformer2DModel.from_pretrained(str(tiny_flux2), subfolder="transformer").eval()
    with torch.no_grad():
        assert torch.equal(model(**model_inputs(config))[0], original(**model_inputs(config))[0])


@pytest.mark.parametrize("prefix", ["", bfl_flux2.PREFIX])
def test_load_bfl_transformer_reads_a_single_file(tiny_flux2_klein, tmp_path, prefix):
    """A BFL file as BFL publishes it, or with ComfyUI's "model.diffusion_model." prefix; the MODEL's config
    as base gives the rotary axes."""
    state, config = transformer_state(tiny_flux2_klein)
    path = tmp_path / "flux2.safetensors"
    save_file({prefix + k: v for k, v in bfl_flux2.diffusers_to_bfl(state).items()}, str(path))
    model = bfl_flux2.load_bfl_transformer(path, config, torch.bfloat16)
    assert all(torch.equal(model.state_dict()[k], v.to(torch.bfloat16)) for k, v in state.items())
    assert model.config.axes_dims_rope == tuple(config["axes_dims_rope"])


def test_bad_files_get_one_clear_error(tiny_flux2_klein, tmp_path):
    state, config = transformer_state(tiny_flux2_klein)
    bfl = bfl_flux2.diffusers_to_bfl(state)
    with pytest.raises(ValueError, match="unexpected key double_blocks.0.img_mod.lin.weight"):   # a FLUX.1 key
        bfl_flux2.bfl_to_diffusers({**bfl, "double_blocks.0.img_mod.lin.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="no img_in.weight"):
        bfl_flux2.config_from_shapes({k: v for k, v in shapes(bfl).items() if k != "img_in.weight"})
    with pytest.raises(ValueError, match=r"rotary axes \(16, 56, 56\) do not add up to .* head dim 8"):
        bfl_flux2.config_from_shapes(shapes(bfl), {"axes_dims_rope": (16, 56, 56)})   # FLUX.1's, as a base
    bfl["single_blocks.1.linear1.weight"] = bfl["single_blocks.1.linear1.weight"][:-1].clone()   # one row short
    save_file(bfl, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="do not make one FLUX.2 transformer.*single_transformer_blocks.1.attn"):
        bfl_flux2.load_bfl_transformer(tmp_path / "bad.safetensors", config, torch.float32)


@pytest.mark.parametrize("preset", ["flux2-klein-4b", "flux2-klein-9b", "flux2-dev"])
def test_real_sizes_on_the_meta_device(preset):
    """At the real widths (head dim 128, mlp_ratio 3), diffusers' converter reads our BFL names and shapes
    back into the model's own, and the config read from the BFL shapes is the preset's."""
    from diffusers import Flux2Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    from shared.presets import get_preset
    config = get_preset(preset).transformer
    with torch.device("meta"):
        state = Flux2Transformer2DModel(**config).state_dict()
    bfl = bfl_flux2.diffusers_to_bfl(state)
    assert shapes(convert_flux2_transformer_checkpoint_to_diffusers(dict(bfl))) == shapes(state)
    assert bfl_flux2.config_from_shapes(shapes(bfl)) == config


def test_an_mlp_ratio_that_is_not_a_round_fraction_of_the_width():
    """Width 44 with a hidden MLP of 98: 98 / 44 * 44 falls just below 98 in floating point, and diffusers
    floors int(width * mlp_ratio); the derived ratio must give 98 back."""
    from diffusers import Flux2Transformer2DModel
    torch.manual_seed(0)
    model = Flux2Transformer2DModel(in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=4,
                                    num_attention_heads=11, joint_attention_dim=12, timestep_guidance_channels=16,
                                    mlp_ratio=2.23, axes_dims_rope=(1, 1, 1, 1), guidance_embeds=False)
    bfl = bfl_flux2.diffusers_to_bfl(model.state_dict())
    config = bfl_flux2.config_from_shapes(shapes(bfl))
    bfl_flux2.transformer_from_state(config, bfl_flux2.bfl_to_diffusers(bfl))   # strict: every shape fits


# -- LoRA -------------------------------------------------------------------------------------------------


def lora_transformer(folder, targets=FLUX2_TARGETS):
    """The tiny transformer with a peft adapter as the trainer adds it, every A and B its own random values."""
    from diffusers import Flux2Transformer2DModel
    from peft import LoraConfig
    model = Flux2Transformer2DModel.from_pretrained(str(folder), subfolder="transformer").eval()
    model.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian", target_modules=targets))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model


def adapter_of(model) -> dict:
    """The adapter as the trainer's final/ holds it: peft's names under "transformer."."""
    from peft.utils import get_peft_model_state_dict
    return {f"transformer.{k}": v for k, v in get_peft_model_state_dict(model).items()}


def comfy_merge(bfl: dict, kohya: dict) -> dict:
    """ComfyUI's LoRA rule (comfy/lora.py model_lora_keys_unet, weight_adapter/lora.py): the model weight
    `diffusion_model.X.weight` takes the LoRA named "lora_unet_" + X with dots as underscores, and adds
    alpha / rank * up @ down. Every LoRA tensor must find its weight."""
    out, used = dict(bfl), set()
    for key in bfl:
        name = "lora_unet_" + key.removesuffix(".weight").replace(".", "_")
        if key.endswith(".weight") and f"{name}.lora_down.weight" in kohya:
            down, up, alpha = (kohya[f"{name}.{s}"] for s in ("lora_down.weight", "lora_up.weight", "alpha"))
            out[key] = bfl[key] + alpha.item() / down.shape[0] * up @ down
            used |= {f"{name}.{s}" for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert used == set(kohya)
    return out


@pytest.mark.parametrize("targets", [FLUX2_TARGETS, r".*transformer_blocks\.\d+\.attn\.(to_q|to_v)"])
def test_kohya_layout_converts_back_exactly_through_diffusers_reader(tiny_flux2_klein, targets):
    """Every tensor of the adapter comes back from diffusers' FLUX.2 kohya reader (A times alpha / rank);
    parts of the fused qkv that had no adapter (to_k here) come back as zeros."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux2_lora_to_diffusers
    model = lora_transformer(tiny_flux2_klein, targets)
    adapter = {k.removeprefix("transformer."): v for k, v in adapter_of(model).items()}
    kohya = peft_to_kohya(adapter, RANK, ALPHA)
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in kohya
    assert ("lora_unet_single_blocks_1_linear1.alpha" in kohya) == (targets == FLUX2_TARGETS)
    back = {k.removeprefix("transformer."): v for k, v in _convert_kohya_flux2_lora_to_diffusers(dict(kohya)).items()}
    for k, v in adapter.items():
        assert torch.equal(back[k], v * ALPHA / RANK if ".lora_A." in k else v), k
    extra = set(back) - set(adapter)
    assert all(torch.count_nonzero(back[k]) == 0 for k in extra)
    assert ("transformer_blocks.0.attn.to_k.lora_B.weight" in extra) == (targets != FLUX2_TARGETS)


def test_comfyui_rule_merges_the_kohya_file_as_peft_merges_the_adapter(tiny_flux2_klein):
    """ComfyUI's merge in BFL's layout, brought back to diffusers' names, is the base plus each diffusers
    layer's B @ A * alpha / rank: the fused qkv carries every part's delta in its own rows."""
    state, _ = transformer_state(tiny_flux2_klein)
    adapter = adapter_of(lora_transformer(tiny_flux2_klein))
    kohya = peft_to_kohya(adapter, RANK, ALPHA)
    merged = bfl_flux2.bfl_to_diffusers(comfy_merge(bfl_flux2.diffusers_to_bfl(state), kohya))
    for k, v in state.items():
        a, b = (adapter.get("transformer." + k.replace(".weight", f".lora_{ab}.weight")) for ab in "AB")
        want = v if a is None else v + ALPHA / RANK * b @ a
        torch.testing.assert_close(merged[k], want, rtol=1e-6, atol=1e-6, msg=k)


def test_flux2_klein_pipeline_loads_the_kohya_file_as_the_peft_adapter_computes(tiny_flux2_klein, tmp_path):
    from diffusers import Flux2KleinPipeline
    model = lora_transformer(tiny_flux2_klein)
    path = tmp_path / "lora.safetensors"
    save_file(peft_to_kohya(adapter_of(model), RANK, ALPHA), str(path))
    pipe = Flux2KleinPipeline.from_pretrained(str(tiny_flux2_klein))
    pipe.load_lora_weights(str(path))
    inputs = model_inputs(dict(model.config))
    with torch.no_grad():
        ours, theirs = model(**inputs)[0], pipe.transformer(**inputs)[0]
        model.disable_adapters()
        base = model(**inputs)[0]
    assert (ours - base).abs().max() > 0.1   # the adapter changes the output
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_a_lora_tensor_with_no_place_is_refused():
    with pytest.raises(ValueError, match="transformer_blocks.0.attn.to_q.lora_B.bias"):
        peft_to_kohya({"transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 8),
                       "transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(8, 4),
                       "transformer_blocks.0.attn.to_q.lora_B.bias": torch.zeros(8)}, RANK, ALPHA)
