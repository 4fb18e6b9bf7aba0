"""Which sizes of a Flux transformer must match what the VAE and the text encoders produce: the one
rule behind the trainer's cache check and flux-sample's model check (each words its own message)."""
from __future__ import annotations


def transformer_misfits(tcfg, latent_channels: int, t5_dim: int, clip_dim: int) -> dict[str, tuple]:
    """{check: (the transformer's size, the size given)} for each size that does not fit, in the order
    latent_channels (in_channels = 4 x latent channels: 2x2 patches), out_channels (= in_channels),
    t5_dim (joint_attention_dim), clip_dim (pooled_projection_dim). `tcfg`: a config dict or object."""
    get = tcfg.get if isinstance(tcfg, dict) else lambda k: getattr(tcfg, k, None)
    in_ch = get("in_channels")
    out_ch = get("out_channels") or in_ch
    checks = {"latent_channels": (in_ch, 4 * latent_channels), "out_channels": (out_ch, in_ch),
              "t5_dim": (get("joint_attention_dim"), t5_dim), "clip_dim": (get("pooled_projection_dim"), clip_dim)}
    return {k: v for k, v in checks.items() if v[0] != v[1]}
