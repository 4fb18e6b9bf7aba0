"""Masked loss (encode --masks, flow.masked_loss) on FLUX.1 and FLUX.2 [klein]: the masks found (alpha, a folder's
masks/, a tar's KEY.mask.png), stored at latent resolution by area averaging, shown by inspect and counted by
plan; the loss against the formula written out with diffusers' own packing, bit for bit with a full mask, and
no gradient from a masked-out half; a cache without masks refused naming the key."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from encode_inputs import image_bytes, write_tar
from PIL import Image
from typer.testing import CliRunner

from preprocess.cli import app
from shared.cache import CacheReader
from shared.family import FLUX1, FLUX2

SIZE = 64      # pixels; latents 8x8 (both tiny VAEs divide by 8)


def _png(array: np.ndarray, mode: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format="PNG")
    return buf.getvalue()


def _pixel_masks() -> dict[str, np.ndarray]:
    """The masks written below, uint8 at SIZE x SIZE: alpha opaque from column 20 (a latent cell half in),
    a mask file's top 24 rows."""
    alpha = np.zeros((SIZE, SIZE), np.uint8)
    alpha[:, 20:] = 255
    top = np.zeros((SIZE, SIZE), np.uint8)
    top[:24] = 255
    return {"alpha": alpha, "file": top}


def _folder(tmp_path):
    folder, m = tmp_path / "images", _pixel_masks()
    (folder / "masks").mkdir(parents=True)
    rgba = np.dstack([np.full((SIZE, SIZE, 3), 90, np.uint8), m["alpha"]])
    (folder / "alpha.png").write_bytes(_png(rgba, "RGBA"))
    for name in ("file", "plain", "wrong", "broken"):
        (folder / f"{name}.jpg").write_bytes(image_bytes((SIZE, SIZE)))
    (folder / "masks" / "file.png").write_bytes(_png(m["file"], "L"))
    (folder / "masks" / "wrong.png").write_bytes(_png(np.zeros((SIZE, SIZE // 2), np.uint8), "L"))
    (folder / "masks" / "broken.png").write_bytes(b"not a png")
    for name in ("alpha", "file", "plain", "wrong", "broken"):
        (folder / f"{name}.txt").write_text(f"a picture {name}")
    return folder


def _encode(model, folder, out, *extra, command="encode"):
    r = CliRunner().invoke(app, [command, "--model", str(model), "--input", str(folder), "--output", str(out),
                                 "--resolution", str(SIZE), "--batch-size", "4", "--num-workers", "0",
                                 "--device", "cpu", "--no-progress", "--dtype", "fp32", *map(str, extra)])
    assert r.exit_code == 0, r.output + repr(r.exception)
    return r


def _area(mask: np.ndarray) -> torch.Tensor:
    """The expected latent mask: each 8x8 pixel block's mean, in [0, 1]."""
    return torch.from_numpy(mask.reshape(SIZE // 8, 8, SIZE // 8, 8).mean(axis=(1, 3)) / 255.0).float()


@pytest.fixture(scope="module", params=["flux1", "flux2"])
def masked(request, tmp_path_factory):
    model = request.getfixturevalue("tiny_model" if request.param == "flux1" else "tiny_flux2_klein")
    tmp = tmp_path_factory.mktemp(f"masked-{request.param}")
    folder = _folder(tmp)
    _encode(model, folder, tmp / "cache", "--masks")
    return model, folder, tmp / "cache", tmp


def test_encode_stores_area_averaged_masks_and_skips_bad_ones(masked):
    model, folder, cache, tmp = masked
    reader = CacheReader(cache)
    assert reader.manifest["dtypes"]["mask"] == "float16" and "masks" in reader.manifest["image"]
    assert reader.manifest["skipped"] == {"bad_mask": 1, "mask_size_mismatch": 1}
    rows = {}
    for shard in reader.shards:
        for rg in reader.iter_shard(shard):
            rows.update({k: m for k, m in zip(rg["key"], rg["mask"])})
    m = _pixel_masks()
    assert torch.equal(rows["alpha"].float(), _area(m["alpha"]))          # column 20: cell 2 is half in
    assert rows["alpha"][0, 2].item() == 0.5
    assert torch.equal(rows["file"].float(), _area(m["file"]))
    assert torch.equal(rows["plain"], torch.ones(8, 8, dtype=torch.float16))
    inspected = CliRunner().invoke(app, ["inspect", str(cache)]).output
    assert "masks          every row: 2 of 3 leave part of the image out" in inspected
    planned = [json.loads(_encode(model, folder, tmp / "p", *extra, "--json", command="plan").stdout)
               for extra in ((), ("--masks",))]
    assert planned[1]["bytes_per_sample"] - planned[0]["bytes_per_sample"] == pytest.approx(2 * 8 * 8)


def test_a_cache_without_masks_has_no_mask_column_and_is_refused_by_masked_loss(tiny_model, tmp_path):
    from shared.cache.manifest import CacheError
    from train.config import load_config
    from train.loop import Trainer
    folder = _folder(tmp_path)
    _encode(tiny_model, folder, tmp_path / "cache")
    reader = CacheReader(tmp_path / "cache")
    assert "mask" not in reader.manifest["dtypes"] and "masks" not in reader.manifest["image"]
    assert "mask" not in reader.open_shard(reader.shards[0]).schema_arrow.names
    assert reader.num_rows == 5       # masks not asked for: no mask is read, none skips its image
    cfg = load_config(None, {"model.name": str(tiny_model), "model.init": "random", "run.max_steps": 1,
                             "data.train_cache": str(tmp_path / "cache"), "run.output_dir": str(tmp_path / "run"),
                             "flow.masked_loss": True})
    with pytest.raises(CacheError, match="flow.masked_loss"):
        Trainer(cfg)


def test_a_tars_mask_members_are_its_samples_masks(tmp_path):
    from preprocess.decode import PrepOptions, shard_batches
    from preprocess.sources import resolve_inputs
    m = _pixel_masks()
    tar = write_tar(tmp_path / "in" / "00000.tar", [
        ("k1.jpg", image_bytes((SIZE, SIZE))), ("k1.txt", b"a"), ("k1.mask.png", _png(m["file"], "L")),
        ("k2.jpg", image_bytes((SIZE, SIZE))), ("k2.txt", b"b")])
    batches = list(shard_batches(resolve_inputs(str(tar))[0], PrepOptions(resolution=SIZE, masks=True), 4))
    masks = batches[-1]["masks"]
    assert torch.equal(masks[0], torch.from_numpy(m["file"])) and bool((masks[1] == 255).all())


def _model_and_batch(family, klein):
    """The family's tiny transformer (random weights) and a batch of two 8x8 latents for it."""
    from train.batch import TrainBatch
    g = torch.Generator().manual_seed(0)
    if family is FLUX1:
        from diffusers import FluxTransformer2DModel

        from shared.presets import transformer_config
        torch.manual_seed(0)
        model, channels, text_dim, pooled = FluxTransformer2DModel(**transformer_config("tiny")), 16, 64, 64
    else:
        from diffusers import Flux2Transformer2DModel
        model = Flux2Transformer2DModel.from_pretrained(str(klein), subfolder="transformer")
        channels, text_dim, pooled = model.config.in_channels // 4, model.config.joint_attention_dim, None
    batch = TrainBatch(key=["a", "b"], latent=torch.randn(2, channels, 8, 8, generator=g),
                       text=torch.randn(2, 5, text_dim, generator=g), text_len=torch.full((2,), 5),
                       pooled=None if pooled is None else torch.randn(2, pooled, generator=g))
    return model.eval(), batch


def _reference_tokens(family, x: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] laid out as the family's image tokens, by diffusers' own pipeline helpers."""
    if family is FLUX1:
        from diffusers import FluxPipeline
        return FluxPipeline._pack_latents(x, x.shape[0], x.shape[1], x.shape[2], x.shape[3])
    from diffusers import Flux2KleinPipeline
    return Flux2KleinPipeline._pack_latents(Flux2KleinPipeline._patchify_latents(x))


@pytest.mark.parametrize("family", [FLUX1, FLUX2], ids=["flux1", "flux2"])
def test_masked_loss_is_the_written_out_formula_and_a_full_mask_the_plain_loss(family, tiny_flux2_klein):
    from train.step import StepSettings, draw, training_loss
    model, batch = _model_and_batch(family, tiny_flux2_klein)
    vae = ({"shift_factor": 0.1, "scaling_factor": 0.5} if family is FLUX1 else
           {"bn_mean": [0.0] * 4 * batch.latent.shape[1], "bn_var": [1.0] * 4 * batch.latent.shape[1], "batch_norm_eps": 0.0})
    settings = StepSettings(family=family, vae=vae)
    plain = training_loss(model, batch, settings, torch.Generator().manual_seed(3), None)
    batch.mask = torch.ones(2, 8, 8, dtype=torch.float16)
    assert torch.equal(training_loss(model, batch, settings, torch.Generator().manual_seed(3), None), plain)

    # half of the first image left out, a ramp on the second: sum(m e) / sum(m) per image, then the batch mean
    mask = torch.ones(2, 8, 8)
    mask[0, :, :4] = 0
    mask[1] = torch.linspace(0.1, 1, 8)[None].half().float()   # as the cache holds it
    batch.mask = mask.half()
    outputs = []
    hook = model.register_forward_hook(lambda mod, args, kwargs_out: outputs.append(kwargs_out[0]))
    loss = training_loss(model, batch, settings, torch.Generator().manual_seed(3), None)
    hook.remove()
    pred = outputs[0]
    pred.retain_grad()
    r = draw(batch, settings, torch.Generator().manual_seed(3))
    x0 = family.to_x0(batch.latent, vae)
    target = family.pack(r["noise"] - x0)
    m = _reference_tokens(family, mask[:, None].expand(-1, batch.latent.shape[1], -1, -1))
    error = (pred.detach() - target) ** 2
    torch.testing.assert_close(loss, ((m * error).sum((1, 2)) / m.sum((1, 2))).mean())
    loss.backward()
    left = _reference_tokens(family, (mask[:, None] == 0).expand(-1, batch.latent.shape[1], -1, -1).float()) > 0
    assert left.any() and bool((pred.grad[left] == 0).all()) and bool((pred.grad[~left] != 0).all())


def test_the_trainer_trains_on_the_masked_cache(masked):
    """The stream reads the masks into each batch (flow.masked_loss), and the run trains and logs."""
    from train.cli import main
    from train_caches import read_metrics
    model, _, cache, tmp = masked
    main(["--model.name", str(model), "--model.init", "random", "--data.train_cache", str(cache),
          "--data.batch_size", "2", "--data.num_workers", "0", "--run.progress", "false", "--run.tensorboard", "false",
          "--run.output_dir", str(tmp / "run"), "--run.max_steps", "2", "--run.log_every", "1",
          "--run.precision", "no", "--flow.guidance_dropout", "0", "--flow.masked_loss", "true"])
    losses = [r["loss"] for r in read_metrics(tmp / "run") if "loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses))
