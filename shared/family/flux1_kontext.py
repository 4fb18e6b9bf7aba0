"""FLUX.1 Kontext [dev]: FLUX.1's transformer, VAE and text encoders, sampled with one reference image
whose tokens follow the noisy ones at position axis 0 = 1 (Flux1.predict, reference_ids). What differs
from FLUX.1 is the folder's pipeline (FluxKontextPipeline) and its sampling defaults; a cache encoded by a
Kontext folder is a Kontext cache, refused by a FLUX.1 model and the reverse (train/model.check_cache_fits)."""
from __future__ import annotations

from .flux1 import Flux1


class Flux1Kontext(Flux1):
    name = "flux1-kontext"
    pipelines = ("FluxKontextPipeline",)
    lora_pipeline = "FluxKontextPipeline"   # FluxLoraLoaderMixin, FluxPipeline's layout
    # BFL's and diffusers' documented Kontext guidance (FluxKontextPipeline's docstring example, BFL's
    # cli_kontext); the pipeline's signature still says FluxPipeline's 3.5.
    default_guidance = 2.5

    def default_steps(self, shift: bool, model_index: dict | None) -> int:
        """FluxKontextPipeline's 28 (Kontext [dev] is guidance-distilled, not step-distilled)."""
        return 28


FLUX1_KONTEXT = Flux1Kontext()
