"""The memory options on the CPU, tiny model: LoRA's bf16 or quantized base, the optimizers and their
step inside the backward, block swap, and the combinations refused before the model is built."""
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from train_caches import read_metrics, tiny_config, write_cache

from shared.models import ModelLoadError
from train.config import ConfigError, ModelConfig
from train.launch import check_launch
from train.loop import Trainer, train
from shared.family.flux1 import FLUX1
from train.model import build_transformer

transformer_blocks = FLUX1.blocks

pytest.importorskip("torchao", reason="quantized bases and adamw8bit need torchao (the dev extra installs it)")

LORA = {"lora.rank": 8, "run.precision": "bf16"}


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("memory")
    return (write_cache(root / "train", 32, row_group_rows=8, rows_per_shard=16),
            write_cache(root / "val", 8, seed=3, prefix="val"))


def weights(trainer) -> dict:
    trainer.settle()
    return {k: v.detach().float().cpu().clone() for k, v in
            trainer.accelerator.unwrap_model(trainer.model).state_dict().items()}


def losses(run_dir) -> list:
    return [(m["step"], m["loss"]) for m in read_metrics(run_dir) if "loss" in m]


# -- LoRA's base --------------------------------------------------------------------------------

BASE_TYPES = {"none": "Parameter", "int8": "Int8Tensor", "float8": "Float8Tensor", "nf4": "NF4Tensor"}


@pytest.mark.parametrize("quantize", list(BASE_TYPES))
def test_lora_on_a_bf16_or_quantized_base_learns_and_samples(quantize, caches, tiny_model, tmp_path):
    from typer.testing import CliRunner

    from sample.cli import app
    cfg = tiny_config(tmp_path, *caches, **LORA, **{
        "model.name": str(tiny_model), "model.init": "pretrained", "model.quantize_base": quantize,
        "run.max_steps": 20, "optim.lr": 1e-2, "data.batch_size": 8, "run.val_every": 20})
    trainer = Trainer(cfg)
    model = trainer.accelerator.unwrap_model(trainer.model)
    base = model.transformer_blocks[0].attn.to_q.base_layer.weight
    assert type(base).__name__ == BASE_TYPES[quantize] and base.dtype == torch.bfloat16
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if not p.requires_grad
               and type(p.data).__name__ in ("Tensor", "Parameter"))
    trainer.train()
    val = [m["val/loss"] for m in read_metrics(tmp_path / "run") if "val/loss" in m]
    assert val[-1] < 0.85 * val[0], val
    final = tmp_path / "run/final"
    assert sorted(p.name for p in final.iterdir()) == ["flux_prep.json", "pytorch_lora_weights.safetensors"]
    adapter = load_file(final / "pytorch_lora_weights.safetensors")
    assert adapter and all("lora" in k and v.dtype == torch.float32 for k, v in adapter.items())
    args = ["--model", tiny_model, "--prompt", "a red circle", "--seed", "1", "--steps", "2", "--width", "32",
            "--height", "32", "--no-progress"]
    with_lora = CliRunner().invoke(app, [str(a) for a in args + ["--lora", final, "--output", tmp_path / "a"]])
    without = CliRunner().invoke(app, [str(a) for a in args + ["--output", tmp_path / "b"]])
    assert with_lora.exit_code == 0 and without.exit_code == 0, with_lora.output + without.output
    from PIL import Image
    a, b = (np.asarray(Image.open(next((tmp_path / d).glob("0000-*.png")))).astype(int) for d in "ab")
    assert np.abs(a - b).max() > 2   # the adapter changed the image


@pytest.mark.parametrize("kind", ["int8", "float8", "nf4"])
def test_a_quantized_layer_keeps_only_its_quantized_weight_for_the_backward(kind):
    from train.quantize import quantize_block
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(256, 512)).to(torch.bfloat16).requires_grad_(False)
    assert quantize_block(layer, kind) == 1
    weight = layer[0].weight
    dense = (weight.get_original_weight() if kind == "nf4" else weight.dequantize()).to(torch.bfloat16)
    x = torch.randn(8, 256, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    assert saved and not any(type(t) is torch.Tensor and t.numel() >= weight.numel() for t in saved)   # no bf16 copy
    y.float().square().sum().backward()
    ref_x = x.detach().clone().requires_grad_(True)
    ref_y = torch.nn.functional.linear(ref_x, dense, layer[0].bias)
    ref_y.float().square().sum().backward()
    assert torch.allclose(y.float(), ref_y.float(), rtol=1e-2, atol=1e-2)
    assert torch.allclose(x.grad.float(), ref_x.grad.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("kind", ["int8", "float8", "nf4"])
def test_a_quantized_layer_under_autocast_computes_in_autocasts_dtype(kind):
    from train.quantize import quantize_block
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(256, 512)).to(torch.bfloat16).requires_grad_(False)
    quantize_block(layer, kind)
    weight = layer[0].weight
    dense = (weight.get_original_weight() if kind == "nf4" else weight.dequantize()).to(torch.bfloat16)
    x = torch.randn(8, 256, requires_grad=True)      # fp32, as a LayerNorm's output is under autocast
    ref_x = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        ref_y = torch.nn.functional.linear(ref_x, dense, layer[0].bias)    # a plain bf16 linear's autocast
    assert y.dtype == ref_y.dtype == torch.bfloat16
    assert torch.allclose(y.float(), ref_y.float(), rtol=1e-2, atol=1e-2)
    y.float().square().sum().backward()
    ref_y.float().square().sum().backward()
    assert x.grad.dtype == torch.float32 and torch.allclose(x.grad, ref_x.grad, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("family", ["flux1", "flux2"])
def test_a_quantized_base_quantizes_the_familys_large_layers_outside_the_blocks(family):
    """FLUX.2's shared modulation layers and text embedder (0.8B of [dev]'s parameters) are quantized with the
    blocks; the first and last layers stay bf16, and so does all of FLUX.1 outside its blocks."""
    from shared.family import get_family
    from shared.tiny_flux2 import _flux2_transformer
    from train.model import place
    fam = get_family(family)
    model = (_flux2_transformer(0, guidance_embeds=True) if family == "flux2"
             else build_transformer(ModelConfig(name="tiny"), seed=0, dtype=torch.float32))
    model = model.to(torch.bfloat16).requires_grad_(False)
    place(model, fam, "cpu", "int8")
    outside = {n: type(m.weight).__name__ for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
               and n.split(".")[0] not in fam.block_lists}
    quantized = {n for n, kind in outside.items() if kind == "Int8Tensor"}
    assert quantized == {n for n in outside if n.split(".")[0] in fam.quantize_outside}
    assert bool(quantized) == (family == "flux2") and not {"x_embedder", "proj_out"} & quantized


def test_published_weights_load_straight_into_bf16(tiny_model):
    from shared.family import load_transformer
    fp32 = load_transformer(str(tiny_model), dtype=torch.float32).state_dict()
    bf16 = build_transformer(ModelConfig(name=str(tiny_model), init="pretrained"), dtype=torch.bfloat16)
    assert all(v.dtype == torch.bfloat16 and torch.equal(v, fp32[k].to(torch.bfloat16))
               for k, v in bf16.state_dict().items())


# -- optimizers -----------------------------------------------------------------------------

def test_in_backward_equals_the_ordinary_step(caches, tmp_path):
    common = {"run.max_steps": 5, "optim.grad_clip": 0.0, "schedule.warmup_steps": 2, "run.deterministic": True}
    ordinary = Trainer(tiny_config(tmp_path / "a", *caches, **common))
    ordinary.train()
    fused = Trainer(tiny_config(tmp_path / "b", *caches, **common, **{"optim.in_backward": True}))
    fused.train()
    a, b = weights(ordinary), weights(fused)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert any((a[k] - build_transformer(ModelConfig(name="tiny")).state_dict()[k]).abs().max() > 1e-3 for k in a)
    assert all(p.grad is None for p in fused.params)   # each gradient freed by its step


def test_step_groups_stay_in_one_block_under_the_cap(tiny_model):
    from train.optim import _owner, step_groups
    named = list(build_transformer(ModelConfig(name=str(tiny_model), init="pretrained")).named_parameters())
    cap = max(p.numel() for _, p in named) // 2
    groups = step_groups(named, cap)
    owner = {id(p): _owner(n) for n, p in named}
    assert [p for g in groups for p in g] == [p for _, p in named]
    assert all(len({owner[id(p)] for p in g}) == 1 for g in groups)
    assert all(sum(p.numel() for p in g) <= cap or len(g) == 1 for g in groups)
    assert any(len(g) > 1 for g in groups) and len({owner[id(p)] for _, p in named}) < len(groups)
    assert _owner("transformer_blocks.3.attn.to_q.weight") == "transformer_blocks.3"
    assert _owner("x_embedder.weight") == "x_embedder"


def test_grouped_steps_equal_steps_one_parameter_at_a_time(caches, tmp_path, monkeypatch):
    import train.optim
    settings = {"optim.name": "adafactor", "model.weights_dtype": "bf16", "run.precision": "bf16",
                "optim.in_backward": True, "optim.grad_clip": 0.0, "run.max_steps": 3, "run.deterministic": True}
    grouped = Trainer(tiny_config(tmp_path / "a", *caches, **settings))
    assert any(len(g) > 1 for g in grouped.optimizer.groups)
    grouped.train()
    monkeypatch.setattr(train.optim, "GROUP_ELEMENTS", 1)
    single = Trainer(tiny_config(tmp_path / "b", *caches, **settings))
    assert all(len(g) == 1 for g in single.optimizer.groups)
    single.train()
    assert losses(tmp_path / "a/run") == losses(tmp_path / "b/run")
    a, b = weights(grouped), weights(single)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # One state per parameter whatever the grouping: checkpoints of either load into the other.
    saved_grouped, saved_single = grouped.optimizer.state_dict(), single.optimizer.state_dict()
    assert len(saved_grouped["inner"]) == len(saved_single["inner"]) == len(grouped.params)
    for x, y in zip(saved_grouped["inner"], saved_single["inner"]):
        assert x["param_groups"] == y["param_groups"] and x["state"].keys() == y["state"].keys()
        assert all(torch.equal(x["state"][0][k], y["state"][0][k]) for k in x["state"].get(0, {}) if torch.is_tensor(
            x["state"][0][k]))
    grouped.optimizer.load_state_dict(saved_single)
    again = grouped.optimizer.state_dict()["inner"]
    assert all(torch.equal(u["state"][0]["exp_avg_sq_row"], v["state"][0]["exp_avg_sq_row"])
               for u, v in zip(again, saved_single["inner"]) if "exp_avg_sq_row" in v["state"].get(0, {}))


OPTIMIZERS = [("adamw", "fp32", False), ("adamw", "fp32", True), ("adamw8bit", "bf16", False),
              ("adamw8bit", "bf16", True), ("adafactor", "bf16", False), ("adafactor", "bf16", True)]


@pytest.mark.parametrize("name, dtype, in_backward", OPTIMIZERS)
def test_kill_and_resume_is_exact(name, dtype, in_backward, caches, tmp_path):
    settings = {"optim.name": name, "model.weights_dtype": dtype, "optim.in_backward": in_backward,
                "run.precision": "bf16" if dtype == "bf16" else "no", "optim.grad_clip": 0.0 if in_backward else 1.0,
                "run.max_steps": 6, "run.checkpoint_every": 3, "data.num_workers": 1, "run.deterministic": True}
    full = Trainer(tiny_config(tmp_path / "a", *caches, **settings))
    full.train()
    train(tiny_config(tmp_path / "b", *caches, **settings), stop_after_step=4)
    resumed = Trainer(tiny_config(tmp_path / "b", *caches, **settings, **{"run.resume": "auto"}))
    resumed.train()
    assert losses(tmp_path / "b/run") == losses(tmp_path / "a/run") and len(losses(tmp_path / "a/run")) == 6
    a, b = weights(full), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    if dtype == "bf16":
        model = resumed.accelerator.unwrap_model(resumed.model)
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_adamw8bit_keeps_8bit_state_and_stochastic_rounding(caches, tmp_path):
    from torchao.optim.subclass_8bit import OptimState8bit
    trainer = Trainer(tiny_config(tmp_path, *caches, **{"optim.name": "adamw8bit", "model.weights_dtype": "bf16",
                                                        "run.precision": "bf16", "run.max_steps": 2}))
    trainer.train()
    opt = trainer.optimizer.optimizer
    assert opt.bf16_stochastic_round
    states = [s["exp_avg"] for s in opt.state.values()]
    assert any(isinstance(s, OptimState8bit) for s in states)   # the big tensors' moments in 8 bits


# -- block swap -------------------------------------------------------------------------------

def watch_residency(trainer) -> list:
    """How many offloaded blocks are on the device as each block's forward runs."""
    seen = []
    for block in transformer_blocks(trainer.accelerator.unwrap_model(trainer.model)):
        block.register_forward_hook(lambda *_: seen.append(len(trainer.offloader.resident())))
    return seen


@pytest.mark.parametrize("case", ["lora", "full"])
def test_block_swap_trains_exactly_as_without(case, caches, tmp_path):
    if case == "lora":
        settings = {**LORA, "run.max_steps": 4, "optim.lr": 1e-2}
    else:
        settings = {"optim.name": "adafactor", "model.weights_dtype": "bf16", "run.precision": "bf16",
                    "optim.in_backward": True, "optim.grad_clip": 0.0, "run.max_steps": 4}
    settings.update({"run.grad_checkpointing": True, "run.deterministic": True})
    plain = Trainer(tiny_config(tmp_path / "a", *caches, **settings))
    plain.train()
    swapped = Trainer(tiny_config(tmp_path / "b", *caches, **settings, **{"run.offload_blocks": 3}))
    model = swapped.accelerator.unwrap_model(swapped.model)
    offloaded = [transformer_blocks(model)[i] for i in swapped.offloader.order]
    assert len(offloaded) == 3
    moved = [(p, host) for i in swapped.offloader.order for p, host in swapped.offloader.moved[i]]
    assert moved and all(p.data_ptr() == host.data_ptr() for p, host in moved)   # at rest in host memory
    assert all(not p.requires_grad for p, _ in moved) == (case == "lora")   # a LoRA adapter stays put
    seen = watch_residency(swapped)
    swapped.train()
    assert losses(tmp_path / "b/run") == losses(tmp_path / "a/run")
    a, b = weights(plain), weights(swapped)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert seen and max(seen) <= 2


# -- activation offload -----------------------------------------------------------------------

def test_activation_offload_trains_exactly_as_without_and_moves_only_activations(caches, tmp_path, monkeypatch):
    import train.activations
    monkeypatch.setattr(train.activations, "MIN_BYTES", 1)   # the tiny model's block inputs are a few KiB
    settings = {**LORA, "run.max_steps": 3, "optim.lr": 1e-2, "run.grad_checkpointing": True,
                "run.deterministic": True}
    plain = Trainer(tiny_config(tmp_path / "a", *caches, **settings))
    plain.train()
    offload = Trainer(tiny_config(tmp_path / "b", *caches, **settings, **{"run.offload_activations": True}))
    model = offload.accelerator.unwrap_model(offload.model)
    params = {p.data_ptr() for p in model.parameters()}
    hooks, moved = offload.activation_offload, []
    pack = hooks.pack
    hooks.pack = lambda t: (moved.append(t.data_ptr()) if hooks.moves(t) else None) or pack(t)
    offload.train()
    assert losses(tmp_path / "b/run") == losses(tmp_path / "a/run")
    a, b = weights(plain), weights(offload)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # with checkpointing a step saves little but each block's inputs; no weight is ever moved
    assert moved and hooks.offloaded > 0 and not params & set(moved)


# -- refusals ---------------------------------------------------------------------------------

REFUSED = [
    ({"model.quantize_base": "int8"}, "model.quantize_base"),
    ({"lora.rank": 4, "run.precision": "no"}, "run.precision bf16"),
    ({**LORA, "run.precision": "fp8", "model.quantize_base": "int8"}, "run.precision fp8 .*model.quantize_base"),
    ({**LORA, "run.precision": "fp8", "run.offload_blocks": 2, "run.grad_checkpointing": True},
     "run.precision fp8 .*run.offload_blocks"),
    ({**LORA, "run.precision": "fp8", "lora.dora": True}, "lora.dora .*run.precision fp8"),
    ({**LORA, "model.weights_dtype": "bf16"}, "model.weights_dtype"),
    ({"model.weights_dtype": "bf16", "run.precision": "no"}, "model.weights_dtype bf16 needs run.precision bf16"),
    ({"optim.in_backward": True}, "optim.grad_clip 0"),
    ({"optim.in_backward": True, "optim.grad_clip": 0.0, "run.grad_accum": 2}, "run.grad_accum"),
    ({**LORA, "run.offload_blocks": 2}, "run.grad_checkpointing"),
    ({"run.offload_blocks": 2, "run.grad_checkpointing": True}, "optim.in_backward"),
    ({**LORA, "run.offload_blocks": 2, "run.grad_checkpointing": True, "model.quantize_base": "nf4"},
     "run.offload_blocks and model.quantize_base"),
    ({**LORA, "run.offload_blocks": 2, "run.grad_checkpointing": True, "run.compile": True}, "run.compile"),
    ({**LORA, "model.quantize_base": "int8", "run.compile": True}, "model.quantize_base int8 and run.compile"),
    ({"run.offload_blocks": -1}, "run.offload_blocks"),
    ({"optim.name": "sgd"}, "optim.name"),
]


@pytest.mark.parametrize("overrides, message", REFUSED)
def test_unsupported_combinations_are_refused_by_the_config(overrides, message, caches, tmp_path):
    with pytest.raises(ConfigError, match=message):
        tiny_config(tmp_path, *caches, **overrides)
    assert not (tmp_path / "run").exists()


def test_launches_that_cannot_run_them_are_refused(caches, tmp_path):
    in_backward = tiny_config(tmp_path, *caches, **{"optim.in_backward": True, "optim.grad_clip": 0.0})
    with pytest.raises(ModelLoadError, match="optim.in_backward"):
        check_launch(in_backward, num_processes=2, fsdp=False)
    swap = tiny_config(tmp_path, *caches, **LORA, **{"run.offload_blocks": 1, "run.grad_checkpointing": True})
    with pytest.raises(ModelLoadError, match="run.offload_blocks"):
        check_launch(swap, num_processes=2, fsdp=False)
    with pytest.raises(ModelLoadError, match="FSDP"):
        check_launch(swap, num_processes=1, fsdp=True)
    with pytest.raises(ModelLoadError, match="optim.in_backward are for one GPU without FSDP"):
        check_launch(in_backward, num_processes=1, fsdp=True)
    check_launch(swap, num_processes=1, fsdp=False)   # one process: fine
    with pytest.raises(ValueError, match="run.offload_blocks: 9 is not between 0 and the model's 4 blocks"):
        Trainer(tiny_config(tmp_path, *caches, **LORA, **{"run.offload_blocks": 9, "run.grad_checkpointing": True}))
