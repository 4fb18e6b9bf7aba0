"""The trainer's config (YAML + --section.key overrides) and model building from presets and folders."""
from pathlib import Path

import pytest
import torch

from train.config import ConfigError, load_config, parse_overrides
from train.loop import lr_factor
from train.model import build_transformer

REPO = Path(__file__).resolve().parent.parent


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {train_cache: /c, batch_size: 2}\noptim: {lr: 1e-4, betas: [0.9, 0.95]}\n"
                    "run: {max_steps: 10, precision: no}\n")
    cfg = load_config(path, parse_overrides(["--optim.lr", "3e-4", "--run.grad_accum=4", "--output-dir", "/o",
                                             "--model.overrides", "{num_layers: 1}", "--resume", "auto"]))
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == (0.9, 0.95) and cfg.data.batch_size == 2 and cfg.run.grad_accum == 4
    assert cfg.run.precision == "no" and cfg.run.output_dir == "/o" and cfg.run.resume == "auto"
    assert cfg.model.overrides == {"num_layers": 1}


def test_params_yaml_train_section(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("encode: {batch: 3}\ntrain:\n  data: {train_cache: /c}\n  run: {epochs: 2}\n")
    assert load_config(path).run.epochs == 2.0
    # other stages' sections may share names with the trainer's (model, data): still the train section
    path.write_text("model: {path: x}\ndata: {size: 64}\ntrain:\n  data: {train_cache: /c}\n  run: {max_steps: 5}\n")
    assert load_config(path).run.max_steps == 5 and load_config(path).data.train_cache == "/c"
    assert load_config(REPO / "params.yaml").data.train_cache == "data/cache/train"


@pytest.mark.parametrize("args, message", [
    (["--optim.lrr", "1"], "optim.lrr"),
    (["--lr", "1"], "--section.key"),
    (["--run.max_steps", "ten"], "run.max_steps"),
    (["--flow.sampler", "gaussian"], "flow.sampler"),
    (["--data.batch_size"], "needs a value"),
    (["--data.val_noise_cache_mb", "-1"], "val_noise_cache_mb"),
])
def test_bad_options_name_themselves(args, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [("data.train_cache", "/c"), ("run.max_steps", 1)] + parse_overrides(args))


def test_lr_warmup_then_cosine():
    f = [lr_factor(s, 2, 10, "cosine", 0.1) for s in range(10)]
    assert f[0] == 0.5 and f[1] == 1.0 and f[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[2:], f[3:])) and f[-1] > 0.1
    assert lr_factor(9, 2, 10, "constant", 0.1) == 1.0


def test_model_from_a_folder_random_or_pretrained(tiny_model):
    from train.config import ModelConfig
    pretrained = build_transformer(ModelConfig(name=str(tiny_model), init="pretrained"))
    from diffusers import FluxTransformer2DModel
    reference = FluxTransformer2DModel.from_pretrained(tiny_model, subfolder="transformer")
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in pretrained.state_dict().items())
    random = build_transformer(ModelConfig(name=str(tiny_model), overrides={"num_layers": 1}), seed=1)
    assert len(random.transformer_blocks) == 1
    again = build_transformer(ModelConfig(name="tiny"), seed=1)
    assert torch.equal(again.x_embedder.weight, build_transformer(ModelConfig(name="tiny"), seed=1).x_embedder.weight)


PRESETS = sorted(str(p.relative_to(REPO)) for p in (REPO / "configs/params").glob("*.yaml"))


@pytest.mark.parametrize("path", ["params.yaml", *PRESETS])
def test_pipeline_params_presets_hold_every_key_dvc_reads(path):
    """Each params preset is a valid trainer config and has every key dvc.yaml interpolates."""
    import re

    import yaml
    params = yaml.safe_load((REPO / path).read_text())
    cfg = load_config(REPO / path)
    assert cfg.data.expected_t5_mode == params["encode"]["t5_mode"]
    dvc_text = (REPO / "dvc.yaml").read_text()
    for ref in set(re.findall(r"\$\{([a-z_.]+)\}", dvc_text)) - {"key", "item"}:
        node = params
        for part in ref.split("."):
            assert isinstance(node, dict) and part in node, f"{path} lacks {ref} (used in dvc.yaml)"
            node = node[part]


def test_cc12m_schnell_preset_is_the_reference_setting():
    """The values of torchtitan's flux_schnell() (torchtitan/models/flux/config_registry.py), which
    MLPerf's FLUX.1 benchmark adapts, written out: the preset must keep them."""
    import yaml
    path = REPO / "configs/params/cc12m-schnell.yaml"
    params, cfg = yaml.safe_load(path.read_text()), load_config(path)
    assert (cfg.optim.lr, tuple(cfg.optim.betas), cfg.optim.eps, cfg.optim.weight_decay, cfg.optim.grad_clip) == \
        (1e-4, (0.9, 0.95), 1e-8, 0.1, 1.0)
    assert (cfg.schedule.kind, cfg.schedule.warmup_steps, cfg.run.max_steps) == ("constant", 3000, 30000)
    assert (cfg.flow.sampler, cfg.flow.guidance_dropout, cfg.flow.guidance_dropout_mode) == \
        ("uniform", 0.447, "independent")
    assert (params["encode"]["t5_mode"], params["encode"]["t5_max_length"], params["encode"]["resolution"]) == \
        ("padded", 256, 256)
    processes = int(params["launch"]["train"].split("--num_processes")[1].split()[0])
    assert cfg.data.batch_size * cfg.run.grad_accum * processes == 64 * 8   # 64 per rank, 8 ranks
    # The posterior sample needs the log-variance in the cache: the encode command stores it.
    assert cfg.flow.latent == "sample" and "--store-logvar" in params["launch"]["encode"]


def test_help_lists_every_key_and_the_choices_of_closed_ones():
    from train.config import CHOICES, TrainConfig, help_text
    text = help_text()
    for section, keys in TrainConfig().to_dict().items():
        assert all(f"--{section}.{key} " in text for key in keys)
    assert "--run.precision 'auto'   (auto | bf16 | fp8 | no)" in text
    assert "--run.masked_attention 'auto'   (auto | sdpa | flex)" in text
    for (section, key), choices in CHOICES.items():
        line = next(ln for ln in text.splitlines() if ln.strip().startswith(f"--{section}.{key} "))
        assert " | ".join(map(str, choices)) in line


def test_the_24gb_lora_preset_is_the_measured_setting():
    """configs/params/dev-lora-24gb.yaml: the bench/memory.py lora row it claims (docs/BENCHMARKS.md)."""
    cfg = load_config(REPO / "configs/params/dev-lora-24gb.yaml")
    assert (cfg.lora.rank, cfg.run.offload_blocks, cfg.model.quantize_base, cfg.data.batch_size) == (16, 38, "none", 1)
    assert cfg.run.grad_checkpointing and cfg.run.precision == "bf16" and cfg.model.init == "pretrained"


def test_precision_auto_is_fp32_on_a_cpu_and_bf16_for_lora():
    plain = load_config(None, {"data.train_cache": "c", "run.max_steps": 1})
    assert plain.run.precision == ("bf16" if torch.cuda.is_available() else "no")
    lora = load_config(None, {"data.train_cache": "c", "run.max_steps": 1, "lora.rank": 4})
    assert lora.run.precision == "bf16"
    assert load_config(None, {"data.train_cache": "c", "run.max_steps": 1, "run.precision": "bf16"}).run.precision == "bf16"


def test_storage_options_are_not_recorded_and_output_dir_stays_local():
    from train.config import NOT_RECORDED
    secret = {"key": "AKIA-not-to-be-written", "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}
    cfg = load_config(None, {"data.train_cache": "s3://b/c", "run.max_steps": 1, "data.storage_options": secret})
    assert cfg.data.storage_options == secret                      # used as given
    recorded = cfg.to_dict()["data"]["storage_options"]
    assert recorded == {"key": NOT_RECORDED, "client_kwargs": NOT_RECORDED}
    with pytest.raises(ConfigError, match="run.output_dir 's3://b/run': the trainer writes to a local folder"):
        load_config(None, {"data.train_cache": "s3://b/c", "run.max_steps": 1, "run.output_dir": "s3://b/run"})
