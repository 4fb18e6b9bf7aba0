"""Stage 2: `accelerate launch train`, the trainer that streams the Parquet cache into the Flux transformer."""
