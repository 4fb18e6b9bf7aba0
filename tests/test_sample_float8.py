"""flux-sample --precision fp8 on the CPU (torch's CPU float8 GEMM runs the code an H100 runs, slowly): the
float8 transformer against torchao's own float8 inference, the image beside bf16's for FLUX.1 and FLUX.2
(batched CFG included), a LoRA merged before the conversion, per-block compile, the device refusal."""
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from sample.run import SampleOptions, encode, load_sampling_transformer, plan
from shared.family import get_family, load_transformer
from shared.sampling import denoise, guided_batch, initial_noise
from shared.text_batch import TextBatch

pytest.importorskip("torchao.float8", reason="fp8 needs torchao (the dev extra installs it)")
from shared.float8 import Float8FrozenLinear, float8_layer  # noqa: E402

# e4m3 keeps 3 mantissa bits: one value rounds by up to 2^-4 of itself. A layer's output sums many such
# products whose roundings are independent, so its error is well below that; the whole transformer's
# prediction (a few layers deep) and the final latents stay under it too. Measured: latents 0.4% (FLUX.1
# tiny), 0.2% (FLUX.2 klein tiny, CFG 4); one prediction about 1%.
FLOAT8_REL = 2 ** -4
H, W, STEPS = 48, 64, 4


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def sample_latents(model, precision, **kw):
    """Final latents as flux-sample makes them (its plan, text encoding, transformer setup and loop)."""
    opts = SampleOptions(model=str(model), output=Path("unused"), prompts=["a red circle"], width=W, height=H,
                         steps=STEPS, seeds=[3], progress=False, precision=precision, **kw)
    p = plan(opts)
    cond, empty, _ = encode(opts, p)
    transformer = load_sampling_transformer(p.source, p.lora, p.dtype, p.device, precision=precision)
    noise = initial_noise(p.family, transformer.config.in_channels // 4, [3], H, W, p.device, p.dtype)
    x = denoise(p.family, transformer, noise, guided_batch(cond, empty), height_px=H, width_px=W, steps=STEPS,
                shift=p.conv.shift, guidance=p.guidance, cfg_scale=p.cfg_scale)
    return x, transformer, p


@pytest.mark.parametrize("which", ["flux1", "flux2_klein"])
def test_fp8_latents_close_to_bf16_not_identical(which, tiny_model, tiny_flux2_klein):
    model = tiny_model if which == "flux1" else tiny_flux2_klein
    plain, _, _ = sample_latents(model, "bf16")
    fp8, transformer, p = sample_latents(model, "fp8")
    assert p.cfg_scale == (4.0 if which == "flux2_klein" else 1.0)   # klein base: both CFG halves in float8
    assert sum(isinstance(m, Float8FrozenLinear) for m in transformer.modules()) > 10
    assert 1e-4 < rel(fp8, plain) < FLOAT8_REL


def random_inputs(family, transformer, tokens=12, text_len=8):
    cfg, g = transformer.config, torch.Generator().manual_seed(0)
    pooled = getattr(cfg, "pooled_projection_dim", None)
    text = TextBatch(torch.randn(1, text_len, cfg.joint_attention_dim, generator=g),
                     None if pooled is None else torch.randn(1, pooled, generator=g), None)
    x = torch.randn(1, tokens, cfg.in_channels, generator=g)
    return dict(tokens=x, timestep=torch.tensor([0.7]), text=text, h=6, w=8,
                guidance=3.5 if cfg.guidance_embeds else None)


def torchao_float8(transformer, family):
    """The reference: torchao's float8 inference, the tensor its Float8DynamicActivationFloat8WeightConfig
    (PerTensor) puts in each token-wise layer (made directly: the config refuses a CPU), and its
    Float8WeightOnlyConfig in the per-sample layers."""
    import torchao.quantization as tq
    from torchao.float8.inference import Float8MMConfig
    from torchao.quantization import Float8Tensor
    from torchao.quantization.granularity import PerTensor
    from torchao.quantization.quantize_.workflows.float8.float8_tensor import QuantizeTensorToFloat8Kwargs
    e4m3 = torch.float8_e4m3fn
    for name, m in transformer.named_modules():
        if float8_layer(family, name, m):
            m.weight = torch.nn.Parameter(Float8Tensor.from_hp(
                m.weight.detach(), float8_dtype=e4m3, granularity=PerTensor(),
                mm_config=Float8MMConfig(use_fast_accum=True),
                act_quant_kwargs=QuantizeTensorToFloat8Kwargs(e4m3, PerTensor())), requires_grad=False)
    tq.quantize_(transformer, tq.Float8WeightOnlyConfig(set_inductor_config=False),
                 filter_fn=lambda m, name: isinstance(m, torch.nn.Linear) and family.per_sample_layer(name)
                 and name not in family.float8_keep)
    return transformer


@pytest.mark.parametrize("which", ["flux1", "flux2_klein"])
def test_one_prediction_is_torchaos_float8_inference(which, tiny_model, tiny_flux2_klein):
    from sample.loop import configure_speed
    model, family = (tiny_model, get_family("flux1")) if which == "flux1" else (tiny_flux2_klein, get_family("flux2"))
    ours = configure_speed(load_transformer(str(model)), float8_family=family)
    ref = torchao_float8(load_transformer(str(model)).requires_grad_(False), family)
    plain = load_transformer(str(model))
    inputs = random_inputs(family, plain)
    with torch.no_grad():
        v, v_ref, v_plain = (family.predict(t, **inputs) for t in (ours, ref, plain))
    # The same float8 numbers (measured 1e-7: fp32 summation order; torchao's weight-only row scales may differ
    # in their last bits, tests/test_train_float8_lora.py), far below float8's own error against fp32 (0.2-0.8%).
    assert rel(v, v_ref) < 1e-5, rel(v, v_ref)
    assert 1e-4 < rel(v, v_plain) < FLOAT8_REL, rel(v, v_plain)
    # per-block compile (the bench's fast row) traces the float8 layers whole and computes the same
    compiled = configure_speed(ours, compile_blocks=True, compile_backend="eager")
    with torch.no_grad():
        assert torch.allclose(family.predict(compiled, **inputs), v, atol=1e-6)


def test_lora_is_merged_in_bf16_then_converted(tiny_model, tmp_path):
    """--lora with fp8: the adapter merged into the full-precision weights, then the sum converted: the
    prediction is peft's LoRA model's within float8's error, and the adapter's effect is well above it."""
    from peft import LoraConfig, get_peft_model

    from sample.resolve import resolve_lora, resolve_transformer
    family = get_family("flux1")
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "ff.net.2"], init_lora_weights=False)
    peft_model = get_peft_model(load_transformer(str(tiny_model)), cfg)
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    lora, _ = resolve_lora(str(tmp_path / "adapter"))
    source = resolve_transformer(family, str(tiny_model), None)
    fp8 = load_sampling_transformer(source, lora, torch.float32, "cpu", precision="fp8")
    assert isinstance(fp8.transformer_blocks[0].attn.to_q, Float8FrozenLinear)
    inputs = random_inputs(family, fp8)
    with torch.no_grad():
        v, v_lora, v_base = (family.predict(t, **inputs) for t in (fp8, peft_model, load_transformer(str(tiny_model))))
    # measured: float8's error 0.9%, the adapter's effect 8%
    assert rel(v, v_lora) < min(FLOAT8_REL, rel(v_base, v_lora) / 4), (rel(v, v_lora), rel(v_base, v_lora))

    # the CLI: the precision recorded beside the other settings (only where not bf16: bf16 PNGs as before)
    from shared.image_files import read_png_text
    from sample.cli import app
    args = ["--model", tiny_model, "--lora", tmp_path / "adapter", "--prompt", "a red circle", "--steps", "2",
            "--width", "32", "--height", "32", "--no-progress"]
    for precision in ("fp8", "bf16"):
        r = CliRunner().invoke(app, [str(a) for a in [*args, "--precision", precision, "--output", tmp_path / precision]])
        assert r.exit_code == 0, r.output
    meta = [read_png_text(next((tmp_path / d).glob("0000-*.png"))) for d in ("fp8", "bf16")]
    assert meta[0]["precision"] == "fp8" and "precision" not in meta[1]


def test_fp8_loads_and_converts_in_host_memory_then_moves(tiny_model, monkeypatch):
    """The device never holds the bf16 weights: the transformer is loaded and converted on the host, then moved
    (here to the meta device, standing for a GPU: what arrives there is already float8)."""
    import sample.run
    from sample.resolve import resolve_transformer
    loaded_on = []

    def spy(*args, **kwargs):
        loaded_on.append(torch.device(args[2]))
        return load_transformer(*args, **kwargs)
    monkeypatch.setattr(sample.run, "load_transformer", spy)
    source = resolve_transformer(get_family("flux1"), str(tiny_model), None)
    model = load_sampling_transformer(source, None, torch.bfloat16, torch.device("meta"), precision="fp8")
    assert loaded_on == [torch.device("cpu")]
    q = model.transformer_blocks[0].attn.to_q
    assert isinstance(q, Float8FrozenLinear) and q.weight.device.type == "meta" and q.weight.dtype == torch.float8_e4m3fn


def test_fp8_refused_on_a_gpu_without_float8_gemms(monkeypatch):
    """An A100 (compute capability 8.0) has no float8 GEMM: refused before anything loads, naming the option
    and the device. (No GPU here: torch.cuda's answers are set to an A100's.)"""
    from sample.run import _check_precision
    from sample.resolve import SampleError
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(SampleError, match=r"--precision fp8 .*8\.9.*cuda:0 \(NVIDIA A100-SXM4-80GB\) has 8\.0"):
        _check_precision("fp8", torch.device("cuda:0"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    _check_precision("fp8", torch.device("cuda:0"))   # an H100 passes
    _check_precision("fp8", torch.device("cpu"))
