"""What a run starts from and what it is applied to: a LoRA trains on the pretrained base unless told
otherwise, the log and flux_prep.json name that base, and what does not fit it is refused or warned
about naming both sides (flux-sample --lora on another base, model.guidance without a guidance
embedding, a model trained on one T5 mode fine-tuned on a cache of the other)."""
import json

import pytest
import torch
from train_caches import tiny_config, write_cache
from typer.testing import CliRunner

from sample.cli import app
from sample.run import SampleOptions, plan
from shared.models import ModelLoadError, transformer_identity
from shared.tiny import write_tiny_model
from train.config import ConfigError, help_text, load_config
from train.loop import Trainer, train

LORA = {"lora.rank": 4, "run.precision": "bf16", "run.max_steps": 1}
PRETRAINED_LORA = {**LORA, "model.init": "auto", "lora.allow_random_base": False}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_cache(tmp_path_factory.mktemp("cache") / "train", 8)


@pytest.fixture(scope="module")
def lora_final(tmp_path_factory, cache, tiny_model):
    """final/ of a LoRA run on the tiny model folder, model.init left at its default."""
    root = tmp_path_factory.mktemp("lora")
    train(tiny_config(root, cache, **{**PRETRAINED_LORA, "model.name": str(tiny_model)}))
    return root / "run/final"


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    """A tiny model folder of the same shapes with other weights."""
    return write_tiny_model(tmp_path_factory.mktemp("other") / "model", seed=1)


def _config(**settings):
    return load_config(None, {"data.train_cache": "c", "run.max_steps": 1, **settings})


def test_model_init_defaults_to_pretrained_for_a_lora_and_random_without():
    assert _config(**{"model.name": "m/x", "lora.rank": 4}).model.init == "pretrained"
    assert _config(**{"model.name": "m/x"}).model.init == "random"
    assert _config(**{"model.name": "m/x", "model.init": "pretrained"}).model.init == "pretrained"


def test_a_lora_on_a_random_base_is_refused_unless_asked_for():
    with pytest.raises(ConfigError, match=r"lora.rank 4 with model.init random .*lora.allow_random_base true"):
        _config(**{"model.name": "m/x", "lora.rank": 4, "model.init": "random"})
    asked = _config(**{"lora.rank": 4, "model.init": "random", "lora.allow_random_base": True})
    assert asked.model.init == "random"


def test_a_lora_of_a_preset_without_weights_is_refused_naming_what_to_set(tmp_path, cache):
    cfg = tiny_config(tmp_path, cache, **PRETRAINED_LORA)   # model.name tiny: a preset, no published weights
    with pytest.raises(ModelLoadError, match=r"preset 'tiny' has no published weights to load .* set model.name"):
        Trainer(cfg)
    assert not (tmp_path / "run").exists()


def test_help_explains_model_init_auto_and_the_opt_in():
    text = help_text()
    assert "--model.init 'auto'   (auto | random | pretrained)" in text
    assert "auto: pretrained for a LoRA" in text
    line = text.index("--lora.allow_random_base False")
    assert "refused unless this is true" in text[line:line + 400]


def test_a_lora_run_loads_the_pretrained_base_and_names_it(tmp_path, cache, tiny_model, lora_final, capsys):
    from diffusers import FluxTransformer2DModel
    trainer = Trainer(tiny_config(tmp_path, cache, **{**PRETRAINED_LORA, "model.name": str(tiny_model)}))
    assert f"base model: pretrained weights of {tiny_model} (transformer sha256 " in capsys.readouterr().out
    loaded = {k.replace(".base_layer", ""): v for k, v in trainer.accelerator.unwrap_model(trainer.model)
              .state_dict().items() if "lora_" not in k}
    published = FluxTransformer2DModel.from_pretrained(tiny_model, subfolder="transformer").state_dict()
    assert loaded.keys() == published.keys()   # the frozen base is the folder's weights (in bf16)
    assert all(torch.equal(loaded[k], v.to(torch.bfloat16)) for k, v in published.items())
    base = json.loads((lora_final / "flux_prep.json").read_text())["base"]
    assert base == {"init": "pretrained", **transformer_identity(str(tiny_model))} and base["sha256"]


def test_a_random_init_is_named_in_the_log(tmp_path, cache, capsys):
    Trainer(tiny_config(tmp_path, cache))
    assert "base model: random weights (seed 0) of tiny's config" in capsys.readouterr().out


def test_guidance_without_a_guidance_embedding_is_refused(tmp_path, cache):
    with pytest.raises(ModelLoadError, match=r"model.guidance 3.5 .* tiny has none \(guidance_embeds false"):
        Trainer(tiny_config(tmp_path, cache, **{"model.guidance": 3.5}))


def test_fine_tuning_a_trimmed_model_on_a_padded_cache_warns_naming_both(tmp_path, cache, capsys):
    train(tiny_config(tmp_path / "first", cache, **{"run.max_steps": 1}))   # a trimmed cache
    final = tmp_path / "first/run/final"
    padded = write_cache(tmp_path / "padded", 8, t5_mode="padded")
    Trainer(tiny_config(tmp_path / "second", padded, **{"model.name": str(final), "model.init": "pretrained"}))
    err = capsys.readouterr().err
    assert f"warning: {final} was trained on trimmed T5 text (its flux_prep.json), and the training cache " \
           f"{padded} holds padded text" in err
    Trainer(tiny_config(tmp_path / "third", cache, **{"model.name": str(final), "model.init": "pretrained"}))
    assert "warning" not in capsys.readouterr().err   # the same mode: nothing to say


def _warnings(tmp_path, model, lora, **options) -> list[str]:
    return plan(SampleOptions(model=str(model), output=tmp_path / "out", prompts=["a circle"], lora=str(lora),
                              **options)).warnings


def test_flux_sample_warns_when_a_lora_meets_another_base(tmp_path, lora_final, tiny_model, other_model):
    assert _warnings(tmp_path, tiny_model, lora_final) == []
    [warning] = _warnings(tmp_path, other_model, lora_final)
    assert f"{lora_final} was trained on the transformer of {tiny_model} (sha256 " in warning
    assert f"applied to {other_model} (transformer) (sha256 " in warning
    assert _warnings(tmp_path, other_model, lora_final, check_base=False) == []
    r = CliRunner().invoke(app, ["--model", str(other_model), "--lora", str(lora_final), "--prompt", "a circle",
                                 "--steps", "1", "--width", "16", "--height", "16", "--no-progress",
                                 "--output", str(tmp_path / "cli")])
    assert r.exit_code == 0, r.output
    assert f"flux-sample: warning: {lora_final} was trained on the transformer of {tiny_model}" in r.output


def test_flux_sample_warns_about_a_lora_of_a_random_base(tmp_path, cache, tiny_model):
    train(tiny_config(tmp_path, cache, **LORA))   # the tiny preset, lora.allow_random_base (tiny_config's)
    [warning] = _warnings(tmp_path, tiny_model, tmp_path / "run/final")
    assert "was trained on randomly initialised weights of tiny's config (lora.allow_random_base)" in warning
