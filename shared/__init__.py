"""What every flux-prep stage agrees on: presets, model loading, latent packing,
flow-matching schedules, prompt encoding and the Parquet cache contract.

This package imports no stage (preprocess, train, sample)."""

__version__ = "0.1.0"

from .quiet import quiet_library_notices

quiet_library_notices()
