"""The fused T5 forward (shared/t5_fused.py) computes what transformers' T5EncoderModel computes."""
import math

import pytest
import torch
from transformers import T5Config, T5EncoderModel

from preprocess.encode import EncodeOptions, Encoders
from shared.family.flux1_text import load_t5
from shared.t5_fused import FusedT5Encoder

CAPTIONS = ["a red circle on a white background", "blue", "a long caption " + "with many words " * 6]


def _inputs(tok, padding="longest", max_length=32):
    return tok(CAPTIONS, padding=padding, max_length=max_length, truncation=True, return_tensors="pt")


@pytest.mark.parametrize("masked", [False, True])
def test_fused_matches_transformers_in_fp32(tiny_model, masked):
    tok, t5 = load_t5(str(tiny_model), torch.float32, torch.device("cpu"))
    fused = FusedT5Encoder(t5)
    ids = _inputs(tok, padding="longest" if masked else "max_length")
    mask = ids.attention_mask if masked else None
    with torch.no_grad():
        ref = t5(ids.input_ids, attention_mask=mask)[0]
    out = fused(ids.input_ids, attention_mask=mask)[0]
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_fused_matches_transformers_in_bf16_within_rounding(tiny_model):
    """The two bf16 forwards round differently, so they agree to bf16's precision only: T5's output
    (after its final RMS norm, values of order 1) differs by at most 4 units in the last place (ulp)
    of its largest value, and the fused forward is no further from the fp32 result (in RMS) than
    transformers' own bf16 forward is. Per element, small values may differ by many of their own
    ulps (the rounding errors of earlier layers are of the scale of the whole vector)."""
    tok, t5 = load_t5(str(tiny_model), torch.bfloat16, torch.device("cpu"))
    fused = FusedT5Encoder(t5)
    ids = _inputs(tok)
    _, t5_fp32 = load_t5(str(tiny_model), torch.float32, torch.device("cpu"))
    with torch.no_grad():
        ref = t5(ids.input_ids, attention_mask=ids.attention_mask)[0].float()
        exact = t5_fp32(ids.input_ids, attention_mask=ids.attention_mask)[0]
    out = fused(ids.input_ids, attention_mask=ids.attention_mask)[0].float()
    assert out.dtype == torch.float32 and fused.dtype == torch.bfloat16
    ulp = torch.finfo(torch.bfloat16).eps * 2.0 ** math.floor(math.log2(ref.abs().max().item()))
    assert (out - ref).abs().max() <= 4 * ulp

    def rms(x):
        return x.pow(2).mean().sqrt().item()
    assert rms(out - exact) <= 1.1 * rms(ref - exact)


def test_release_source_frees_the_copied_weights_and_keeps_the_function(tiny_model):
    tok, t5 = load_t5(str(tiny_model), torch.float32, torch.device("cpu"))
    ids = _inputs(tok)
    with torch.no_grad():
        ref = t5(ids.input_ids, attention_mask=ids.attention_mask)[0]
    fused = FusedT5Encoder(t5, release_source=True)
    block = t5.encoder.block[1]
    assert block.layer[0].SelfAttention.q.weight.numel() == 0
    assert block.layer[-1].DenseReluDense.wi_0.weight.numel() == 0
    torch.testing.assert_close(fused(ids.input_ids, attention_mask=ids.attention_mask)[0], ref, atol=1e-5, rtol=1e-5)


def test_a_non_gated_t5_is_refused_with_the_reason():
    t5 = T5EncoderModel(T5Config(vocab_size=64, d_model=16, d_ff=32, d_kv=4, num_heads=4, num_layers=1,
                                 feed_forward_proj="relu"))
    assert not FusedT5Encoder.supports(t5)
    with pytest.raises(ValueError, match="gated"):
        FusedT5Encoder(t5)


def test_encoders_use_the_fused_forward_unless_told_otherwise(tiny_model):
    def impl(**options):
        return Encoders(str(tiny_model), "cpu", EncodeOptions(text_options=options)).text.t5_impl
    assert impl() == "fused"
    assert impl(t5_impl="transformers") == "transformers"
    assert impl(t5_fp32_wo=True) == "transformers"
    with pytest.raises(ValueError, match="t5_impl"):
        impl(t5_impl="fast")


@pytest.mark.parametrize("mode", ["padded", "trimmed"])
def test_a_short_batch_padded_to_full_size_gives_the_same_rows(tiny_model, mode):
    enc = Encoders(str(tiny_model), "cpu", EncodeOptions(text_mode=mode, text_max_length=32))
    pixels = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    plain = enc.encode_batch(pixels, CAPTIONS).wait()
    enc.pad_batches = True          # what --compile turns on
    padded = enc.encode_batch(pixels, CAPTIONS, pad_to=8).wait()
    assert padded.keys() == plain.keys()
    for name in plain:
        assert padded[name].shape[0] == 3
        if name == "t5" and mode == "trimmed":   # the padding rows' empty captions do not lengthen the batch
            assert padded[name].shape == plain[name].shape
        torch.testing.assert_close(padded[name], plain[name], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention", ["flex", "efficient", "cudnn", "auto"])
@pytest.mark.parametrize("masked", [False, True])
def test_every_attention_path_matches_sdpa(tiny_model, masked, attention):
    """flex runs here as its eager reference; the CUDA-only kernels fall back to SDPA on a CPU."""
    tok, t5 = load_t5(str(tiny_model), torch.float32, torch.device("cpu"))
    ids = _inputs(tok, padding="longest" if masked else "max_length")
    mask = ids.attention_mask if masked else None
    sdpa = FusedT5Encoder(t5)(ids.input_ids, attention_mask=mask)[0]
    other = FusedT5Encoder(t5, attention=attention)(ids.input_ids, attention_mask=mask)[0]
    torch.testing.assert_close(other, sdpa, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("length", [1, 7, 48])
def test_the_position_table_holds_the_bias_of_every_query_key_pair(tiny_model, length):
    _, t5 = load_t5(str(tiny_model), torch.float32, torch.device("cpu"))
    enc = FusedT5Encoder(t5)
    bias, table = enc.position_bias(length)[0], enc.position_table(length)
    assert table.shape == (t5.config.num_heads, 2 * length - 1)
    q, k = torch.meshgrid(torch.arange(length), torch.arange(length), indexing="ij")
    torch.testing.assert_close(table[:, k - q + length - 1], bias, atol=0, rtol=0)


def test_auto_attention_picks_flex_for_long_text_on_cuda_only(tiny_model):
    from shared.t5_fused import FLEX_MIN_LENGTH
    _, t5 = load_t5(str(tiny_model), torch.float32, torch.device("cpu"))
    enc = FusedT5Encoder(t5, attention="auto")
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert enc.kernel(FLEX_MIN_LENGTH, cuda) == enc.kernel(512, cuda) == "flex"
    assert enc.kernel(FLEX_MIN_LENGTH - 16, cuda) == "efficient"
    assert enc.kernel(512, cpu) == "sdpa"
    assert FusedT5Encoder(t5, attention="cudnn").kernel(16, cuda) == "cudnn"


def test_an_unknown_attention_is_refused(tiny_model):
    _, t5 = load_t5(str(tiny_model), torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="attention must be one of"):
        FusedT5Encoder(t5, attention="fast")
