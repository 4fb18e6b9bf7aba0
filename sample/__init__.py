"""Stage 3, `flux-sample`: the denoising loop and image output."""
