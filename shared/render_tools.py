"""Which tools can render a trained model, from the T5 mode it was trained with (flux_prep.json's `t5_mode`).

diffusers' FluxPipeline pads T5 to `max_sequence_length` and hands every position to the transformer
with no mask, as FLUX.1 was trained; ComfyUI and Forge do the same. A model trained on trimmed T5 (real
tokens only, the rest masked) has never attended to padding, and in those tools draws noise where
flux-sample, which reads flux_prep.json and masks as the trainer did, draws the prompt. A padded model
renders everywhere, given the T5 length it was trained with (FluxPipeline's `max_sequence_length`).
"""
from __future__ import annotations

EVERYWHERE = ["flux-sample", "diffusers", "comfyui", "forge"]
TRIMMED_NOTE = ("trained on trimmed T5 (real tokens only, masked): diffusers' FluxPipeline, ComfyUI and Forge "
                "pad T5 without a mask and draw noise with it; render it with flux-sample, or train on a cache "
                "encoded with --t5-mode padded for those tools")


def renders_in(t5_mode: str) -> list[str]:
    """The tools that render a model trained with `t5_mode` as it was trained."""
    return ["flux-sample"] if t5_mode == "trimmed" else list(EVERYWHERE)


def render_fields(t5_mode: str) -> dict:
    """flux_prep.json's fields that tell a reader where the model renders (and, trimmed, why not elsewhere)."""
    return {"renders_in": renders_in(t5_mode), **({"renders_note": TRIMMED_NOTE} if t5_mode == "trimmed" else {})}


def other_tools_warning(info: dict) -> str | None:
    """A warning for a model handed to other tools (export) that they cannot render; None where they can.
    A flux_prep.json written before `renders_in` is judged by its `t5_mode`."""
    if info.get("text_mode") != "trimmed":
        return None
    return f"warning: {TRIMMED_NOTE}"
