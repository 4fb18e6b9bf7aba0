"""`flux-prep encode --text-precision fp8`: the text encoder's matmuls in float8 (shared/text_float8.py).

Tolerances: float8 e4m3 keeps 3 mantissa bits, so each operand's value is rounded by up to 2^-4 (6%) and each
matmul's output is off by about 5% RMS; the tiny encoders' final states measured 3-5% off bf16's (relative
Frobenius error) with every token's cosine similarity at least 0.993. The bounds below are twice that error
(0.1) and a per-token cosine of 0.98; "not identical" is an error above 0.5%."""
from __future__ import annotations

import json

import pytest
import torch
from encode_inputs import good_members, write_tar
from typer.testing import CliRunner

from preprocess.cli import app
from shared.cache import CacheReader

MAX_REL, MIN_COS, MIN_DIFF = 0.1, 0.98, 0.005
CAPTIONS = ["a red cat on a mat", "two dogs", "", "a long caption about a picture of a red square " * 3]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _min_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    """The lowest cosine similarity of any token's states [..., D]."""
    return float(torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).min())


def test_float8_t5_matches_torchao_per_tensor_quantization(tiny_model, monkeypatch):
    """The outside reference: transformers' T5EncoderModel quantized by torchao's own
    Float8DynamicActivationFloat8WeightConfig(PerTensor) over the same layers. torchao refuses to quantize
    without a float8 GPU (a hardware gate only: its CPU path runs the same _scaled_mm), so the gate is lifted."""
    import torchao.quantization.quant_api as quant_api
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerTensor, quantize_

    from shared.family.flux1_text import load_t5
    from shared.text_float8 import t5_choose, t5_to_float8
    monkeypatch.setattr(quant_api, "_check_hardware_support", lambda granularity: None)
    tok, plain = load_t5(str(tiny_model))
    ours, ao = load_t5(str(tiny_model))[1], load_t5(str(tiny_model))[1]
    assert t5_to_float8(ours) == 12   # 2 blocks x q, k, v, o, wi_0, wi_1; wo stays
    quantize_(ao, Float8DynamicActivationFloat8WeightConfig(granularity=PerTensor()),
              filter_fn=lambda m, name: isinstance(m, torch.nn.Linear) and t5_choose(name, m))
    ids = tok(CAPTIONS, padding="max_length", max_length=64, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        want, got, ref = ao(ids)[0], ours(ids)[0], plain(ids)[0]
    assert _rel(got, want) < 2e-3            # the same recipe: fp32 compute, so only rounding order differs
    assert MIN_DIFF < _rel(got, ref) < MAX_REL and _min_cos(got, ref) > MIN_COS


def _args(model, inputs, out, *extra):
    return ["encode", "--model", str(model), "--input", str(inputs), "--output", str(out), "--resolution", "32",
            "--min-size", "16", "--text-max-length", "32", "--batch-size", "4", "--num-workers", "0",
            "--dtype", "fp32", "--device", "cpu", "--no-progress", *extra]


def _columns(cache) -> dict:
    from tests.test_encode_run import read_rows
    rows = read_rows(cache)
    return {c: torch.stack([rows[k][c] for k in sorted(rows)]) for c in ("latent", "t5", "clip")}


def test_fp8_encode_is_recorded_close_to_bf16_and_a_rerun_with_bf16_refused(tiny_model, tmp_path):
    inputs = write_tar(tmp_path / "in" / "a-00000.tar", good_members("a", 5))
    runner = CliRunner()
    plain = runner.invoke(app, _args(tiny_model, inputs, tmp_path / "bf16"))
    fp8 = runner.invoke(app, _args(tiny_model, inputs, tmp_path / "fp8", "--text-precision", "fp8"))
    assert plain.exit_code == 0 and fp8.exit_code == 0, plain.output + fp8.output
    bf16_settings = json.loads((tmp_path / "bf16" / "_progress" / "settings.json").read_text())
    assert "text_precision" not in bf16_settings and "text_precision" not in CacheReader(tmp_path / "bf16").manifest
    assert CacheReader(tmp_path / "fp8").manifest["text_precision"] == "fp8"

    a, b = _columns(tmp_path / "bf16"), _columns(tmp_path / "fp8")
    assert torch.equal(a["latent"], b["latent"]) and torch.equal(a["clip"], b["clip"])   # CLIP stays as it was
    assert MIN_DIFF < _rel(b["t5"], a["t5"]) < MAX_REL and _min_cos(b["t5"], a["t5"]) > MIN_COS

    inspected = runner.invoke(app, ["inspect", str(tmp_path / "fp8")])
    assert "t5         padded, max length 32, text encoder matmuls in fp8" in inspected.output
    again = runner.invoke(app, _args(tiny_model, inputs, tmp_path / "fp8"))
    assert again.exit_code == 2
    assert 'refusing to mix caches (text_precision: cache has "fp8", this run "bf16")' in again.output
    again = runner.invoke(app, _args(tiny_model, inputs, tmp_path / "bf16", "--text-precision", "fp8"))
    assert 'text_precision: cache has "bf16", this run "fp8"' in again.output
    planned = runner.invoke(app, ["plan", *_args(tiny_model, inputs, tmp_path / "p", "--text-precision", "fp8")[1:]])
    assert "text precision fp8 (encode times measured in bf16)" in planned.output, planned.output


def test_flux2_text_encoder_in_float8_is_close_to_bf16(tiny_flux2_dev):
    """FLUX.2's text encoder (the tiny [dev]'s Mistral; [klein]'s Qwen3 has the same layer names) in float8:
    its projections and MLPs (those of float8-aligned sizes) replaced, the pipeline's states close."""
    from shared.family.flux2_text import Flux2TextEncoder
    from shared.float8 import Float8FrozenLinear
    plain = Flux2TextEncoder(str(tiny_flux2_dev), "cpu", torch.float32, mode="padded", max_length=64)
    fp8 = Flux2TextEncoder(str(tiny_flux2_dev), "cpu", torch.float32, mode="padded", max_length=64, precision="fp8")
    assert any(isinstance(m, Float8FrozenLinear) for m in fp8.encoder.modules())
    a, b = plain.encode(CAPTIONS)["text"], fp8.encode(CAPTIONS)["text"]
    assert MIN_DIFF < _rel(b, a) < MAX_REL and _min_cos(b, a) > MIN_COS


@pytest.mark.parametrize("capability, refused", [((8, 6), True), ((9, 0), False)])
def test_fp8_is_refused_on_a_gpu_without_float8_gemms(monkeypatch, capability, refused):
    from shared.text_float8 import check_text_precision
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "an A100")
    if refused:
        refusal = r"--text-precision fp8 needs float8 GEMMs .* has 8\.6: use --text-precision bf16"
        with pytest.raises(ValueError, match=refusal):
            check_text_precision("fp8", "cuda:0")
    else:
        check_text_precision("fp8", "cuda:0")
    check_text_precision("bf16", "cuda:0")   # never refused
