"""The EMA against its formula, shadow = decay * shadow + (1 - decay) * weights after every `every`
steps, for full training and for a LoRA adapter."""
import pytest
import torch
from safetensors.torch import load_file
from train_caches import tiny_config, write_cache

from train.loop import Trainer


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_cache(tmp_path_factory.mktemp("ema") / "c", 16)


def trained_with_history(tmp_path, cache, **overrides):
    """Train; return the trainer and the trainable weights after each step (index 0: the initial ones)."""
    trainer = Trainer(tiny_config(tmp_path, cache, **overrides))
    model = trainer.accelerator.unwrap_model(trainer.model)

    def trainable():
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    history = []
    trainer.train(on_batch=lambda _: history.append(trainable()))   # before each step: the previous step's weights
    history.append(trainable())
    return trainer, history


def expected_ema(history, decay, every):
    shadow = dict(history[0])
    for step in range(1, len(history)):
        if step % every == 0:
            shadow = {n: decay * shadow[n] + (1 - decay) * history[step][n] for n in shadow}
    return shadow


@pytest.mark.parametrize("every, steps", [(1, 3), (2, 4)])
def test_ema_follows_the_formula(tmp_path, cache, every, steps):
    _, history = trained_with_history(tmp_path, cache, **{"run.max_steps": steps, "ema.decay": 0.6,
                                                          "ema.every": every})
    ema = load_file(tmp_path / "run/final/ema/diffusion_pytorch_model.safetensors")
    final = load_file(tmp_path / "run/final/diffusion_pytorch_model.safetensors")
    expected = expected_ema(history, 0.6, every)
    for name, value in expected.items():
        torch.testing.assert_close(ema[name], value, rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(ema[n], final[n]) for n in expected)   # the average is not the last weights


def test_ema_of_a_lora_adapter(tmp_path, cache):
    _, history = trained_with_history(tmp_path, cache, **{"run.max_steps": 3, "ema.decay": 0.6,
                                                          "lora.rank": 4, "run.precision": "bf16"})
    ema = load_file(tmp_path / "run/final/ema/pytorch_lora_weights.safetensors")
    final = load_file(tmp_path / "run/final/pytorch_lora_weights.safetensors")
    expected = {n.replace(".default", ""): v for n, v in expected_ema(history, 0.6, 1).items()}
    last = {n.replace(".default", ""): v for n, v in history[-1].items()}
    assert set(ema) == set(final) and len(ema) == len(expected)
    for saved, value in ema.items():
        name = saved.removeprefix("transformer.")
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-7)
        assert torch.equal(final[saved], last[name])
