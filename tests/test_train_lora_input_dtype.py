"""train/model.keep_input_dtype: the trainer's LoRA layers skip peft's cast of their input to fp32, which autocast
undoes; under autocast the layer's output and every gradient are the same bit for bit."""
import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import inject_adapter_in_model
from peft.tuners.lora import LoraLayer

from shared.family import get_family
from shared.presets import transformer_config
from train.config import LoraConfig
from train.model import add_lora


def adapted_block(cast: bool):
    from diffusers.training_utils import cast_training_params
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 48)).to(torch.bfloat16)
    model = inject_adapter_in_model(PeftLoraConfig(r=4, target_modules=["0"], init_lora_weights="gaussian"), model)
    cast_training_params(model, dtype=torch.float32)
    model[0].cast_input_dtype_enabled = cast
    return model


@pytest.mark.parametrize("input_dtype", [torch.bfloat16, torch.float32])   # fp32: a norm's output under autocast
def test_without_the_cast_a_lora_layer_computes_the_same_under_autocast(input_dtype):
    results = []
    for cast in (True, False):
        model = adapted_block(cast)
        x = torch.randn(3, 7, 32, generator=torch.Generator().manual_seed(1)).to(input_dtype).requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
        y.float().square().sum().backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        results.append((y, x.grad, grads))
    (y1, gx1, g1), (y2, gx2, g2) = results
    assert y1.dtype == y2.dtype and torch.equal(y1, y2) and torch.equal(gx1, gx2)
    assert len(g1) == 2 and all(torch.equal(a, b) for a, b in zip(g1, g2))


@pytest.mark.parametrize("settings,off", [({}, True), ({"dora": True}, False), ({"kind": "lokr"}, None)])
def test_the_trainers_lora_layers_skip_the_cast_but_dora_keeps_it(settings, off):
    family = get_family("flux1")
    model = family.transformer_cls()(**transformer_config("tiny")).to(torch.bfloat16)
    add_lora(model, LoraConfig(rank=4, **settings), family)
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    if off is None:   # LoKr: peft's LyCORIS layers, another forward
        assert not layers
        return
    assert layers and all(m.cast_input_dtype_enabled is not off for m in layers)
