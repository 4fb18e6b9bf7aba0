"""train/adafactor.py: transformers' Adafactor step as one function, compiled on a GPU (optim.fused). Against
transformers' own Adafactor (the trainer's settings): the same weights step for step, eagerly and compiled,
with the lr changing every step (one compile per weight shape, not per lr), and checkpoints either way."""
import pytest
import torch
from transformers.optimization import Adafactor

from train.adafactor import CompiledAdafactor
from train.config import OptimConfig
from train.optim import make_optimizer


def make_params(dtype):
    g = torch.Generator().manual_seed(1)
    return [torch.nn.Parameter(torch.randn(48, 32, generator=g).to(dtype)),
            torch.nn.Parameter(torch.randn(32, generator=g).to(dtype))]


def run_steps(optimizers, params, steps=5, first=0):
    for step in range(first, first + steps):
        g = torch.Generator().manual_seed(10 + step)
        grads = [torch.randn(p.shape, generator=g) for p in params[0]]
        for opt, ps in zip(optimizers, params):
            for p, grad in zip(ps, grads):
                p.grad = grad.to(p.dtype)
            opt.step()
            for group in opt.param_groups:   # the trainer's schedule sets a new lr each step
                group["lr"] *= 0.9


def reference(params):
    return Adafactor(params, lr=1e-2, weight_decay=0.01, scale_parameter=False, relative_step=False,
                     warmup_init=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_step_is_transformers_adafactor(dtype):
    a, b = make_params(dtype), make_params(dtype)
    ref, mine = reference(a), CompiledAdafactor(b, lr=1e-2, weight_decay=0.01, compiled=False)
    run_steps([ref, mine], [a, b])
    for x, y, start in zip(a, b, make_params(dtype)):   # bf16: the same; fp32: a last bit (1 - beta2t in fp32)
        assert torch.equal(x, y) if dtype == torch.bfloat16 else torch.allclose(x, y, rtol=1e-6, atol=0)
        assert not torch.equal(x, start)
    for key, p, q in (("exp_avg_sq_row", a[0], b[0]), ("exp_avg_sq_col", a[0], b[0]), ("exp_avg_sq", a[1], b[1])):
        assert torch.allclose(ref.state[p][key], mine.state[q][key], rtol=1e-6, atol=0)
    assert ref.state[a[0]]["step"] == mine.state[b[0]]["step"] == 5


def test_compiled_once_per_shape_and_equal_to_eager():
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    a, b = make_params(torch.bfloat16), make_params(torch.bfloat16)
    eager, compiled = (CompiledAdafactor(ps, lr=1e-2, weight_decay=0.01, compiled=c)
                       for ps, c in ((a, False), (b, True)))
    before = counters["stats"]["unique_graphs"]
    run_steps([eager, compiled], [a, b])
    assert counters["stats"]["unique_graphs"] - before == 2   # the matrix and the vector; not one per lr
    for x, y in zip(a, b):
        assert (x.float() - y.float()).abs().max() <= x.float().abs().max() * 2 ** -8   # fused fp32, one bf16 rounding


def test_checkpoints_move_between_the_two_and_optim_fused_picks_it():
    a, b = make_params(torch.bfloat16), make_params(torch.bfloat16)
    mine = CompiledAdafactor(b, lr=1e-2, weight_decay=0.01, compiled=False)
    ref = reference(a)
    run_steps([ref, mine], [a, b], steps=3)
    # continue the reference from the compiled optimizer's state: the same weights as the reference's own run
    c = [torch.nn.Parameter(p.detach().clone()) for p in b]
    resumed = reference(c)
    resumed.load_state_dict(mine.state_dict())
    run_steps([ref, resumed], [a, c], steps=2, first=3)
    assert resumed.state[c[0]]["step"] == ref.state[a[0]]["step"] == 5
    # the states differ in their last bits (1e-7), which may move a weight by one bf16 step
    assert all((x.float() - y.float()).abs().max() <= x.float().abs().max() * 2 ** -8 for x, y in zip(a, c))
    cfg = OptimConfig(name="adafactor", lr=1e-3)
    assert type(make_optimizer(cfg, make_params(torch.bfloat16), "cpu")) is Adafactor
    fused = OptimConfig(name="adafactor", lr=1e-3, fused=True)
    assert type(make_optimizer(fused, make_params(torch.bfloat16), "cpu")) is CompiledAdafactor
