"""Stage 1, the `flux-prep` CLI: from captioned images to the Parquet cache."""
