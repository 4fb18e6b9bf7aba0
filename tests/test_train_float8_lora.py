"""run.precision fp8 with LoRA (shared/float8.py, train/float8_lora.py) on the CPU: torch's CPU float8 GEMM runs the same
Float8FrozenLinear code as an H100 (slowly). The layer against torchao's Float8Linear, the conversion of
each family's base, a LoRA run beside the bf16 base's (losses, frozen float8 base, resume, flux-sample
--lora), and FSDP refused (the config's refusals: tests/test_train_memory.py's REFUSED)."""
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from train_caches import read_metrics, tiny_config, write_cache

from shared.family import get_family
from shared.models import ModelLoadError
from shared.presets import transformer_config
from train.config import LoraConfig
from train.launch import check_launch
from train.loop import Trainer, train
from train.model import add_lora

pytest.importorskip("torchao.float8", reason="fp8 needs torchao (the dev extra installs it)")
from shared.float8 import Float8FrozenLinear, Float8StoredLinear, freeze_to_float8  # noqa: E402

LORA_FP8 = {"lora.rank": 4, "run.precision": "fp8"}


class CountScaledMM(torch.utils._python_dispatch.TorchDispatchMode):
    """How many GEMMs ran (torchao's Float8Linear calls mm on its float8 tensors, which then run _scaled_mm)."""
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func in (torch.ops.aten._scaled_mm.default, torch.ops.aten.mm.default)
        return func(*args, **(kwargs or {}))


def test_the_layer_is_torchaos_float8_linear_without_the_weight_gradient():
    """torchao's Float8Linear (its default recipe: tensorwise, e4m3 forward, e5m2 gradient) is the
    reference: the same output (to one bf16 rounding: the bias is added inside the GEMM here) and the
    same input gradient; but the frozen weight is stored in float8 and gets no gradient GEMM."""
    from torchao.float8 import Float8LinearConfig
    from torchao.float8.float8_linear import Float8Linear
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48, dtype=torch.bfloat16).requires_grad_(False)
    ref = Float8Linear.from_float(linear, Float8LinearConfig())
    mine = Float8FrozenLinear.from_linear(linear)
    assert mine.weight.dtype == torch.float8_e4m3fn and not mine.weight.requires_grad
    x = torch.randn(2, 40, 64, dtype=torch.bfloat16, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    grad = torch.randn(2, 40, 48, dtype=torch.bfloat16)
    outputs, counts = [], []
    for layer, inp in ((mine, x), (ref, x_ref)):
        with CountScaledMM() as forward:
            y = layer(inp)
        with CountScaledMM() as backward:
            y.backward(grad)
        outputs.append(y.detach())
        counts.append((forward.calls, backward.calls))
    y_mine, y_ref = outputs
    ulp = y_ref.float().abs().max() * 2 ** -7
    assert (y_mine.float() - y_ref.float()).abs().max() <= ulp
    assert torch.equal(x.grad, x_ref.grad)
    assert counts == [(1, 1), (1, 2)]   # torchao also runs the weight-gradient GEMM
    assert mine.weight.grad is None


def test_a_per_sample_layer_stored_in_float8_computes_as_torchaos_float8_weight_only():
    """Float8StoredLinear against torchao's Float8WeightOnlyConfig (one e4m3 scale per output row): the same
    weights after the round trip, the same product to a bf16 rounding, and an input gradient through them."""
    import torchao.quantization as tq
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96, dtype=torch.bfloat16).requires_grad_(False)
    mine = Float8StoredLinear(linear)
    ref = torch.nn.Sequential(torch.nn.Linear(64, 96, dtype=torch.bfloat16))
    ref[0].load_state_dict(linear.state_dict())
    tq.quantize_(ref, tq.Float8WeightOnlyConfig(set_inductor_config=False))
    dense = (mine.weight.float() * mine.weight_scale).bfloat16()
    ref_dense = ref[0].weight.dequantize().float()
    # torchao's scale differs in its last bits (1e-6 relative), which moves a few values by one float8 step
    assert ((dense.float() - ref_dense).abs() <= ref_dense.abs() * 2 ** -3 + 1e-6).all()
    x = torch.randn(3, 64, dtype=torch.bfloat16, requires_grad=True)
    y = mine(x)
    y_ref = ref(x.detach())
    assert (y.float() - y_ref.float()).abs().max() <= y_ref.float().abs().max() * 2 ** -5
    assert (y.float() - linear(x.detach()).float()).abs().max() <= y_ref.float().abs().max() * 2 ** -4
    y.sum().backward()
    assert torch.allclose(x.grad.float(), dense.float().sum(0).expand(3, -1), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("family_name,preset", [("flux1", "tiny"), ("flux2", "flux2-tiny")])
def test_the_frozen_token_wise_layers_become_float8_and_the_rest_stay(family_name, preset):
    family = get_family(family_name)
    torch.manual_seed(0)
    model = family.transformer_cls()(**transformer_config(preset)).to(torch.bfloat16)
    add_lora(model, LoraConfig(rank=4), family)
    count = freeze_to_float8(model, family)
    converted = {n for n, m in model.named_modules() if isinstance(m, Float8FrozenLinear)}
    kept = {n for n, m in model.named_modules() if type(m) is torch.nn.Linear}
    assert len(converted) == count
    assert {"context_embedder", "transformer_blocks.0.attn.to_q.base_layer",
            "single_transformer_blocks.0.attn.to_out.base_layer" if family_name == "flux2" else
            "single_transformer_blocks.0.proj_out.base_layer"} <= converted
    assert {"x_embedder", "proj_out"} <= kept
    assert all("lora_" in n or n in family.float8_keep for n in kept)
    # the per-sample layers (modulation, time embedding): stored in float8 too, weight-only
    per_sample = {n: m for n, m in model.named_modules() if family.per_sample_layer(n) and hasattr(m, "in_features")}
    assert "norm_out.linear" in per_sample and len(per_sample) > 3
    assert all(isinstance(m, Float8StoredLinear) and m.weight.dtype == torch.float8_e4m3fn
               for m in per_sample.values())
    assert all(m.weight.dtype == torch.float32 for n, m in model.named_modules() if "lora_" in n and
               type(m) is torch.nn.Linear)


def test_lora_fp8_trains_like_the_bf16_base_resumes_and_samples(tiny_model, tmp_path):
    from typer.testing import CliRunner

    from sample.cli import app
    cache = write_cache(tmp_path / "cache", 16, rows_per_shard=8, row_group_rows=4)
    settings = {"model.name": str(tiny_model), "model.init": "pretrained", "lora.rank": 4, "run.max_steps": 4,
                "run.checkpoint_every": 2, "run.deterministic": True, "optim.lr": 1e-2}
    train(tiny_config(tmp_path / "bf16", cache, **settings, **{"run.precision": "bf16"}))
    trainer = Trainer(tiny_config(tmp_path / "fp8", cache, **settings, **{"run.precision": "fp8"}))
    model = trainer.accelerator.unwrap_model(trainer.model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    q = model.transformer_blocks[0].attn.to_q
    assert q.base_layer.weight.dtype == torch.float8_e4m3fn and q.lora_A.default.weight.dtype == torch.float32
    adapter = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)   # base frozen
    assert any(not torch.equal(p, adapter[n]) for n, p in model.named_parameters() if n in adapter)
    loss = lambda d: [m["loss"] for m in read_metrics(d / "run") if "loss" in m]  # noqa: E731
    ref, got = loss(tmp_path / "bf16"), loss(tmp_path / "fp8")
    # Same data, noise, init and adapter init: float8 rounding moves each step's loss a little (1e-4
    # relative here; 0.5% allowed).
    assert len(got) == 4 and max(abs(a - b) / a for a, b in zip(ref, got)) < 5e-3, (ref, got)
    assert got != ref   # the float8 path ran

    # Resuming from checkpoint 2 continues the same losses and ends with the same adapter.
    cut = {**settings, **LORA_FP8}
    train(tiny_config(tmp_path / "cut", cache, **cut), stop_after_step=3)
    train(tiny_config(tmp_path / "cut", cache, **cut, **{"run.resume": "auto"}))
    assert loss(tmp_path / "cut") == got
    a = load_file(tmp_path / "fp8/run/final/pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "cut/run/final/pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == torch.float32 for k in a)

    # final/ is an ordinary LoRA of the bf16 base: flux-sample applies it.
    args = ["--model", tiny_model, "--prompt", "a red circle", "--seed", "1", "--steps", "2", "--width", "32",
            "--height", "32", "--no-progress"]
    runs = [CliRunner().invoke(app, [str(a) for a in args + extra + ["--output", tmp_path / out]])
            for out, extra in (("a", ["--lora", tmp_path / "fp8/run/final"]), ("b", []))]
    assert all(r.exit_code == 0 for r in runs), runs[0].output + runs[1].output
    from PIL import Image
    a, b = (np.asarray(Image.open(next((tmp_path / d).glob("0000-*.png")))).astype(int) for d in "ab")
    assert np.abs(a - b).max() > 2   # the adapter changed the image


def test_fp8_lora_under_fsdp_is_refused_before_the_model_is_built(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path / "cache", **LORA_FP8)
    with pytest.raises(ModelLoadError, match="run.precision fp8 with LoRA.*FSDP"):
        check_launch(cfg, 2, fsdp=True)
    check_launch(cfg, 1, fsdp=False)


def test_the_diagnostic_switches_compute_the_same_input_gradient(monkeypatch):
    """bench/memory_speed.py's diagnostic rows: the transposed weight kept from the start gives the input
    gradient the per-call transpose gives, bit for bit; fast accumulation changes nothing on a CPU either
    (its GEMM has one accumulation), and neither is saved in the state dict."""
    import shared.float8 as float8
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48, dtype=torch.bfloat16).requires_grad_(False)
    grads = []
    for keep, fast in ((False, False), (True, False), (True, True)):
        monkeypatch.setattr(float8, "KEEP_TRANSPOSED", keep)
        monkeypatch.setattr(float8, "GRAD_FAST_ACCUM", fast)
        layer = Float8FrozenLinear.from_linear(linear)
        assert (layer.weight_t is not None) == keep and "weight_t" not in layer.state_dict()
        x = torch.randn(2, 40, 64, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(1)).requires_grad_()
        layer(x).float().square().sum().backward()
        grads.append(x.grad)
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[1], grads[2])
