"""Hand-set weights for the tiny AutoencoderKL (FLUX.1) and AutoencoderKLFlux2 (FLUX.2): an exact
8x8 average-pool encoder and a nearest-neighbour decoder, built inside diffusers' real VAE classes
(both use the same Encoder and Decoder).

Why: a random VAE decodes any latent to noise, and fitting one on two CPU cores takes far
longer than the demo may. With these weights the latent of an image is its colour per 8x8
block (scaled so that x0 = (mean - shift) * scale is the RGB value in [-1, 1]), so a tiny
transformer trained on the demo produces pictures whose colours can be measured.

How: every residual branch (ResNet convs, attention projections) is zeroed, so blocks pass
their input through, and the optional 1x1 quant convs are the identity; downsampling convs
average 2x2 pixels, upsampling convs copy. The only
non-linear layers left are the final GroupNorm + SiLU of encoder and decoder. Each colour
channel c travels as the group (v, -v, K, -K): the group's mean is exactly 0 and its std
sqrt((E[v^2] + K^2) / 2) ~ K/sqrt(2), so the norm scales v by a constant to within
E[v^2]/K^2 ~ 1e-6; a shift of S = 20 keeps SiLU in its linear range.
"""
from __future__ import annotations

import math

import torch

K = 1000.0          # the constant channels that pin the GroupNorm statistics
S = 20.0            # SiLU(x + S) = x + S to within 1e-8 for |x| <= 3
LOGVAR = -12.0      # posterior log-variance: practically deterministic latents
GROUP = 4           # channels per GroupNorm group: (v, -v, K, -K)


def _zero(module) -> None:
    for p in module.parameters():
        p.zero_()


def _pass_through_blocks(coder) -> None:
    """Zero the residual branch of every ResNet and attention block: each becomes the identity."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D
    for m in coder.modules():
        if isinstance(m, ResnetBlock2D):
            if m.conv_shortcut is not None or m.output_scale_factor != 1:
                raise ValueError("the hand-set tiny VAE needs equal block widths and output_scale_factor 1")
            _zero(m.conv2)
            _zero(m.conv1)
        elif isinstance(m, Attention):
            for lin in (m.to_q, m.to_k, m.to_v, m.to_out[0]):
                _zero(lin)


def _spread_colours(conv, colours: int, weight, bias) -> None:
    """Input channel c -> the group (w_c*x + b_c, -(w_c*x + b_c), K, -K) at output channels 4c..4c+3."""
    _zero(conv)
    for c in range(colours):
        conv.weight[GROUP * c, c, 1, 1] = weight[c]
        conv.weight[GROUP * c + 1, c, 1, 1] = -weight[c]
        conv.bias[GROUP * c] = bias[c]
        conv.bias[GROUP * c + 1] = -bias[c]
        conv.bias[GROUP * c + 2] = K
        conv.bias[GROUP * c + 3] = -K


def _linear_norm(norm, colours: int) -> None:
    """GroupNorm that gives back v + S on each colour channel and 0 elsewhere."""
    if norm.num_channels // norm.num_groups != GROUP:
        raise ValueError(f"the hand-set tiny VAE needs GroupNorm groups of {GROUP} channels")
    _zero(norm)
    for c in range(colours):
        norm.weight[GROUP * c] = K / math.sqrt(2.0)
        norm.bias[GROUP * c] = S


def _per_channel(value, n: int) -> list[float]:
    """A scalar or one value per latent channel, as n Python floats (a scalar is kept in double)."""
    if isinstance(value, (int, float)):
        return [float(value)] * n
    values = [float(v) for v in value]
    if len(values) != n:
        raise ValueError(f"expected {n} per-channel values, got {len(values)}")
    return values


def _identity(conv) -> None:
    """A 1x1 conv that passes its input through (the optional quant convs)."""
    _zero(conv)
    for ch in range(conv.out_channels):
        conv.weight[ch, ch, 0, 0] = 1.0


@torch.no_grad()
def set_pooling_weights(vae, shift=None, scale=None) -> None:
    """Overwrite `vae`'s weights in place (see the module docstring).

    x0 = (mean - shift) * scale; shift and scale default to the config's shift_factor and scaling_factor
    (FLUX.1) and may be one value per latent channel (FLUX.2 normalises per channel, with its BatchNorm)."""
    cfg = vae.config
    latent = cfg.latent_channels
    shift = _per_channel(cfg.shift_factor if shift is None else shift, latent)
    scale = _per_channel(cfg.scaling_factor if scale is None else scale, latent)
    enc, dec = vae.encoder, vae.decoder
    for conv in (getattr(vae, "quant_conv", None), getattr(vae, "post_quant_conv", None)):
        if conv is not None:
            _identity(conv)
    _pass_through_blocks(enc)
    _pass_through_blocks(dec)
    # Encoder: pixels -> groups, 2x2 average per downsampler, norm, then mean = rgb / scale + shift.
    _spread_colours(enc.conv_in, 3, [1.0] * 3, [0.0] * 3)
    for block in enc.down_blocks:
        for down in block.downsamplers or []:
            _zero(down.conv)
            for ch in range(down.conv.out_channels):
                down.conv.weight[ch, ch, 0:2, 0:2] = 0.25
    _linear_norm(enc.conv_norm_out, 3)
    _zero(enc.conv_out)
    enc.conv_out.bias[:latent] = torch.tensor(shift)    # unused latent channels: x0 = 0
    enc.conv_out.bias[latent:] = LOGVAR
    for c in range(3):
        enc.conv_out.weight[c, GROUP * c, 1, 1] = 1.0 / scale[c]
        enc.conv_out.bias[c] = shift[c] - S / scale[c]
    # Decoder: mean -> rgb = (mean - shift) * scale as groups, copy on upsampling, norm, out.
    _spread_colours(dec.conv_in, 3, scale, [-s * k for s, k in zip(shift, scale)])
    for block in dec.up_blocks:
        for up in block.upsamplers or []:
            _zero(up.conv)
            for ch in range(up.conv.out_channels):
                up.conv.weight[ch, ch, 1, 1] = 1.0
    _linear_norm(dec.conv_norm_out, 3)
    _zero(dec.conv_out)
    for c in range(3):
        dec.conv_out.weight[c, GROUP * c, 1, 1] = 1.0
        dec.conv_out.bias[c] = -S
