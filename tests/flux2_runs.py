"""The FLUX.2 [klein] chain tests' shared steps (tests/test_flux2_chain.py, tests/test_flux2_more.py): encode
the demo images with a tiny folder, train through the trainer's command line, render with flux-sample."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

PROMPT = "a red circle on a black background"
SIZE, STEPS, SEED = 64, 4, 0
PNG = "0000-a-red-circle-on-a-black-background-seed0.png"


def invoke(app, *args):
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output + repr(r.exception)
    return r


def encode_klein_cache(model: Path, root: Path) -> Path:
    """24 demo images and the sample prompt, encoded by `model` into root/cache, tensors in fp32."""
    from preprocess.cli import app as prep_app
    from preprocess.demo import write_demo_shards
    write_demo_shards(root / "raw", num_samples=24, size=SIZE, samples_per_shard=12, seed=0)
    (root / "prompts.txt").write_text(PROMPT + "\n")
    invoke(prep_app, "encode", "--model", model, "--input", root / "raw", "--output", root / "cache",
           "--resolution", SIZE, "--batch-size", 8, "--num-workers", 0, "--dtype", "fp32", "--no-progress",
           "--sample-prompts", root / "prompts.txt")
    return root / "cache"


def train(tmp_path, model, cache, *extra):
    from train.cli import main
    main(["--model.name", str(model), "--data.train_cache", str(cache), "--data.batch_size", "4",
          "--data.num_workers", "0", "--run.progress", "false", "--run.tensorboard", "false",
          "--run.output_dir", str(tmp_path), "--flow.guidance_dropout", "0", *map(str, extra)])
    return tmp_path


def flux_sample(out, model, *extra):
    from sample.cli import app as sample_app
    invoke(sample_app, "--model", model, "--prompt", PROMPT, "--output", out, "--steps", STEPS, "--width", SIZE,
           "--height", SIZE, "--no-progress", *extra)
    return np.asarray(Image.open(out / PNG)).astype(np.int16)


def pipeline_image(pipe, **kw) -> np.ndarray:
    import torch
    pipe.set_progress_bar_config(disable=True)
    image = pipe(prompt=PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS, output_type="np",
                 generator=torch.Generator().manual_seed(SEED), **kw).images[0]
    return np.round(image * 255).astype(np.int16)
