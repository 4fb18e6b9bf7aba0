"""run.precision fp8: float8 matmuls (torchao) in the transformer's token-wise linear layers, on the CPU
(torch's CPU float8 matmul runs the same Float8Linear code as an H100, slowly)."""
import sys

import pytest
import torch
from safetensors.torch import load_file
from train_caches import read_metrics, tiny_config, write_cache

from shared.models import ModelLoadError
from shared.presets import transformer_config
from train.loop import Trainer, train
from shared.family.flux1 import FLUX1
from shared.float8 import float8_layer
from train.model import convert_to_float8

pytest.importorskip("torchao.float8", reason="fp8 needs torchao (the dev extra installs it)")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_cache(tmp_path_factory.mktemp("f8") / "train", 16, rows_per_shard=8, row_group_rows=4)


def tiny_model():
    from diffusers import FluxTransformer2DModel
    torch.manual_seed(0)
    return FluxTransformer2DModel(**transformer_config("tiny"))


def test_token_wise_layers_get_float8_and_the_rest_stay():
    from torchao.float8.float8_linear import Float8Linear
    model = tiny_model()
    linear = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    count = convert_to_float8(model, FLUX1)
    converted = {n for n, m in model.named_modules() if isinstance(m, Float8Linear)}
    assert len(converted) == count
    assert {"context_embedder", "transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_k_proj",
            "transformer_blocks.1.ff.net.0.proj", "transformer_blocks.1.ff_context.net.2",
            "single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.1.proj_out"} <= converted
    kept = linear - converted
    assert {"x_embedder", "proj_out", "norm_out.linear", "transformer_blocks.0.norm1.linear",
            "single_transformer_blocks.0.norm.linear", "time_text_embed.timestep_embedder.linear_1"} <= kept
    assert not any(float8_layer(FLUX1, n, m) for n, m in model.named_modules() if n in kept)


def test_fp8_trains_like_bf16_saves_plain_weights_and_resumes(tmp_path, cache):
    settings = {"run.max_steps": 4, "run.checkpoint_every": 2, "run.deterministic": True, "optim.lr": 2e-3}
    bf16 = tiny_config(tmp_path / "bf16", cache, **settings, **{"run.precision": "bf16"})
    train(bf16)
    fp8 = tiny_config(tmp_path / "fp8", cache, **settings, **{"run.precision": "fp8"})
    trainer = Trainer(fp8)
    trainer.train()
    loss = lambda d: [m["loss"] for m in read_metrics(d / "run") if "loss" in m]  # noqa: E731
    ref, got = loss(tmp_path / "bf16"), loss(tmp_path / "fp8")
    assert len(got) == 4 and all(torch.isfinite(torch.tensor(got)))
    # Same data, noise and init: float8 rounding moves each step's loss a little, not the course.
    assert max(abs(a - b) / a for a, b in zip(ref, got)) < 0.01, (ref, got)
    assert got != ref   # the float8 path did run

    # final/ holds plain weights under the usual names, loadable without torchao's classes.
    from diffusers import FluxTransformer2DModel
    loaded = FluxTransformer2DModel.from_pretrained(tmp_path / "fp8/run/final")
    trained = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    assert set(loaded.state_dict()) == set(trained)
    assert all(torch.equal(v, trained[k]) for k, v in loaded.state_dict().items())

    # Resuming from checkpoint 2 continues the same losses and ends with the same weights.
    cut = tiny_config(tmp_path / "cut", cache, **settings, **{"run.precision": "fp8"})
    train(cut, stop_after_step=3)
    train(tiny_config(tmp_path / "cut", cache, **settings, **{"run.precision": "fp8", "run.resume": "auto"}))
    assert loss(tmp_path / "cut") == got
    a = load_file(tmp_path / "fp8/run/final/diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "cut/run/final/diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fp8_without_torchao_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao.float8", None)   # import fails as if not installed
    with pytest.raises(ModelLoadError, match=r"pip install -e '\.\[fp8\]'"):
        convert_to_float8(tiny_model(), FLUX1)
