"""Float8 scales for T5's matmuls, on the CPU: per tensor (what `--text-precision fp8` uses) against per row
(one scale per token of the input, per output row of the weight), with T5's FF output layer `wo` in bf16 or in
float8, as outliers grow in wo's input. Both are torchao's own Float8DynamicActivationFloat8WeightConfig.

    python bench/t5_fp8_scales.py        # about a minute on one core

A random-init T5 (d_model 512, d_ff 1024, 4 layers, bf16) has no outliers of its own; they are put in with the
function unchanged: the first 4 rows of each FF's wi_1 scaled by s and the same columns of wo by 1/s, so wo's
input carries 4 channels s times larger. Error: the final states against the bf16 model's (relative
Frobenius; lowest per-token cosine). Measured (torch 2.13 CPU, torchao 0.18; docs/DESIGN.md, "Text precision"):

| outliers | per tensor, wo bf16 | per tensor, wo fp8 | per row, wo bf16 | per row, wo fp8 |
|---|---|---|---|---|
| none | 0.066 / 0.9965 | 0.078 / 0.9947 | 0.066 / 0.9961 | 0.077 / 0.9951 |
| x300 | 0.066 / 0.9966 | 0.078 / 0.9949 | 0.066 / 0.9961 | 0.078 / 0.9940 |
| x3000 | 0.067 / 0.9961 | 0.087 / 0.9931 | 0.066 / 0.9959 | 0.078 / 0.9950 |
| x30000 | 0.172 / 0.9770 | 0.331 / 0.9191 | 0.066 / 0.9962 | 0.104 / 0.9730 |

e4m3 is a floating-point format: one scale for a tensor costs nothing until its values span more than its
normal range (2^-6 to 448, about 3e4); at x30000 even wo bf16 suffers, there through wi_1's weight, whose
scaled rows leave the others subnormal under one weight scale.
"""
from __future__ import annotations

import copy

import torch


def main():
    import torchao.quantization.quant_api as quant_api
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor, quantize_
    from transformers import T5Config, T5EncoderModel
    quant_api._check_hardware_support = lambda granularity: None   # a GPU gate only: the CPU runs _scaled_mm
    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(vocab_size=512, d_model=512, d_ff=1024, num_layers=4, num_heads=8, d_kv=64,
                                 feed_forward_proj="gated-gelu", is_encoder_decoder=False)).eval().to(torch.bfloat16)
    ids = torch.randint(0, 512, (8, 128))
    for s in (1, 300, 3000, 30000):
        base = with_outliers(t5, s)
        with torch.no_grad():
            ref = base(ids)[0].float()
        for gname, granularity in (("per tensor", PerTensor()), ("per row", PerRow())):
            for wo in (False, True):
                names = ("q", "k", "v", "o", "wi_0", "wi_1") + (("wo",) if wo else ())
                m = copy.deepcopy(base)
                quantize_(m, Float8DynamicActivationFloat8WeightConfig(granularity=granularity),
                          filter_fn=lambda mod, fqn: isinstance(mod, torch.nn.Linear) and fqn.rpartition(".")[2] in names)
                with torch.no_grad():
                    out = m(ids)[0].float()
                cos = torch.nn.functional.cosine_similarity(out, ref, dim=-1)
                print(f"outliers x{s:<6} {gname:<10} wo {'fp8' if wo else 'bf16'}: relative error "
                      f"{float((out - ref).norm() / ref.norm()):.3f}, min cosine {float(cos.min()):.4f}", flush=True)


def with_outliers(t5, s: float, channels: int = 4):
    m = copy.deepcopy(t5)
    with torch.no_grad():
        for block in m.encoder.block:
            ff = block.layer[-1].DenseReluDense
            ff.wi_1.weight[:channels] *= s
            ff.wo.weight[:, :channels] /= s
    return m


if __name__ == "__main__":
    main()
