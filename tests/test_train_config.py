"""The trainer's config (YAML + --section.key overrides) and model building from presets and folders."""
from pathlib import Path

import pytest
import torch

from train.config import ConfigError, load_config, parse_overrides
from train.launch import lr_factor
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


@pytest.mark.parametrize("args, message", [
    (["--run.max_steps", "1.5"], r"run.max_steps: .*integer.*fractional"),       # was truncated to 1
    (["--run.max_steps=1.5"], r"run.max_steps: .*integer"),
    (["--run.max_stepz", "3"], r"unknown config key 'run.max_stepz'; run has output_dir, max_steps"),
    (["--runn.max_steps", "3"], r"unknown config section 'runn'"),
    (["--schedule.kind", "linear"], r"schedule.kind: .*'constant' or 'cosine'.*'linear'"),
    (["--data.expected_text_mode", "padded256"], r"data.expected_text_mode: .*'padded' or 'trimmed'"),
    (["--run.compile", "maybe"], r"run.compile: .*boolean"),
    (["--optim.betas", "0.9"], r"optim.betas: .*tuple"),
    (["--model.overrides", "[1, 2]"], r"model.overrides: .*dictionary"),
    (["--optim.lr", "fast"], r"optim.lr: .*number"),
])
def test_bad_command_line_values_are_errors_naming_the_key(args, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [("data.train_cache", "/c"), ("run.max_steps", 1)] + parse_overrides(args))


@pytest.mark.parametrize("text, message", [
    ("run: {max_steps: 1.5}", r"run.max_steps: .*fractional"),
    ("run: {max_steps: ten}", r"run.max_steps: .*integer"),
    ("run: {max_steps: 5, precison: bf16}", r"unknown config key 'run.precison'"),
    ("flow: {sampler: gaussian}", r"flow.sampler: .*'uniform', 'logit_normal', 'flux_shift', 'sigmoid', 'shift' or 'mode'"),
    ("run: {precision: fp16}", r"run.precision: .*'auto', 'bf16', 'fp8' or 'no'"),
    ("data: {batch_size: [1, 2]}", r"data.batch_size: .*integer"),
    ("data: {train_cache: [a]}", r"data.train_cache\[0\]: give \{cache"),   # a list holds {cache, weight}s
    ("optim: 3", r"optim: .*dictionary"),
    ("train: {run: {progress: sometimes}}", r"run.progress: .*boolean"),
])
def test_bad_yaml_values_are_errors_naming_the_key(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text("data: {train_cache: /c}\n" + text + "\n" if not text.startswith("train:") else text)
    with pytest.raises(ConfigError, match=message):
        load_config(path, {"run.max_steps": 1} if "max_steps" not in text else None)


def test_yaml_booleans_and_numbers_read_as_dvc_writes_them(tmp_path):
    """YAML 1.2 (DVC's): `no` is a string (run.precision's fp32 choice), yet a bool field takes it; an
    exponent without a dot (how `dvc exp run -S train.optim.lr=3e-4` writes it) is a float."""
    path = tmp_path / "c.yaml"
    path.write_text("data: {train_cache: /c}\nrun: {max_steps: 2.0, precision: no, progress: no, compile: yes}\n"
                    "optim: {lr: 3e-4}\n")
    cfg = load_config(path)
    assert cfg.run.precision == "no" and cfg.run.progress is False and cfg.run.compile is True
    assert cfg.optim.lr == 3e-4 and cfg.run.max_steps == 2 and isinstance(cfg.run.max_steps, int)
    cfg = load_config(path, parse_overrides(["--run.precision", "no", "--run.resume", "null", "--run.epochs", "1"]))
    assert cfg.run.precision == "no" and cfg.run.resume is None and cfg.run.epochs == 1.0


def test_help_gives_every_key_its_help_text():
    from train.config import TrainConfig, help_text
    lines = help_text().splitlines()
    for section, keys in TrainConfig().to_dict().items():
        for key in keys:
            at = next(i for i, ln in enumerate(lines) if ln.strip().startswith(f"--{section}.{key} "))
            below = lines[at + 1] if at + 1 < len(lines) else ""
            assert below.startswith("        ") and not below.strip().startswith("--"), f"{section}.{key} has no help"
    text = help_text()
    assert "held-out cache for the validation loss" in text
    assert "drawn once and reused (32 bytes per latent value); past it, drawn each pass" in " ".join(text.split())


def test_lr_warmup_then_cosine():
    f = [lr_factor(s, 2, 10, "cosine", 0.1) for s in range(10)]
    assert f[0] == 0.5 and f[1] == 1.0 and f[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[2:], f[3:])) and f[-1] > 0.1
    assert lr_factor(9, 2, 10, "constant", 0.1) == 1.0


@pytest.mark.parametrize("kind, warmup, min_ratio", [("constant", 0, 0.0), ("constant", 5, 0.0), ("cosine", 0, 0.0),
                                                     ("cosine", 5, 0.0), ("cosine", 5, 0.1), ("cosine", 50, 0.1)])
def test_lr_schedule_against_diffusers_get_scheduler(kind, warmup, min_ratio):
    """diffusers' get_scheduler (what its training scripts use) against the trainer's schedule. Two
    differences keep the trainer's own formula: diffusers' warmup starts at 0 (step k at k / warmup,
    so the first optimizer step changes nothing) where the trainer's step k is at (k + 1) / warmup,
    and diffusers' cosine has no floor (schedule.min_lr_ratio). Otherwise they agree: the trainer's
    warmup is diffusers' one step on, and its cosine is diffusers' lifted onto the floor."""
    from diffusers.optimization import get_scheduler
    total = 100
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = get_scheduler("constant_with_warmup" if kind == "constant" else kind, opt,
                          num_warmup_steps=warmup, num_training_steps=total)
    theirs = []
    for _ in range(total + 1):
        theirs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    ours = [lr_factor(k, warmup, total, kind, min_ratio) for k in range(total + 1)]
    for k in range(total + 1):
        if k < warmup:
            assert ours[k] == pytest.approx(theirs[k + 1], abs=1e-12), k
        else:
            assert ours[k] == pytest.approx(min_ratio + (1 - min_ratio) * theirs[k], abs=1e-12), k
    if warmup:
        assert theirs[0] == 0.0 and ours[0] == 1 / warmup


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
    assert cfg.data.train_cache and cfg.run.output_dir
    dvc_text = (REPO / "dvc.yaml").read_text()
    refs = set(re.findall(r"\$\{([a-z_.]+)\}", dvc_text))
    for ref in {r for r in refs if r.split(".")[0] not in ("key", "item")}:
        node = params
        for part in ref.split("."):
            assert isinstance(node, dict) and part in node, f"{path} lacks {ref} (used in dvc.yaml)"
            node = node[part]


@pytest.mark.parametrize("path", ["params.yaml", *PRESETS])
def test_each_pipeline_fact_is_written_once(path):
    """The model folder and the text mode live in model.path and encode.text_mode alone: dvc.yaml passes
    them to the trainer, whose section does not repeat them (they were kept equal by hand)."""
    import yaml
    params = yaml.safe_load((REPO / path).read_text())
    assert "name" not in params["train"].get("model", {})
    assert "expected_text_mode" not in params["train"].get("data", {})
    train_cmd = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["train"]["cmd"]
    assert "--model.name ${model.path}" in train_cmd and "--data.expected_text_mode ${encode.text_mode}" in train_cmd
    cfg = load_config(REPO / path, {"model.name": params["model"]["path"],
                                    "data.expected_text_mode": params["encode"]["text_mode"]})
    assert (cfg.model.name, cfg.data.expected_text_mode) == (params["model"]["path"], params["encode"]["text_mode"])


# The demo's encode command written out: the manifest records --config's settings as these flags.
DEMO_ENCODE_COMMAND = ("flux-prep encode --model data/models/tiny --input data/raw/demo-train "
                       "--output data/cache/train --resolution 64 --text-mode trimmed --text-max-length 32 "
                       "--batch-size 64 --num-workers 1 --no-progress --sample-prompts sample/prompts/demo.txt")


def _parsed(command, cmd: str, after: str):
    """The context `command` (a click command) makes of the arguments after `after` in `cmd`."""
    import shlex
    argv = shlex.split(cmd)
    return command.make_context(after, argv[argv.index(after) + 1:]), argv[argv.index(after):]


def _assert_all_from_the_file(ctx, section: dict):
    """Each key of the section is the value of its option, given by --config alone (not repeated as a flag)."""
    from shared.params import option_keys
    keys = option_keys(ctx.command)
    for key, value in section.items():
        name = keys[key][0].name
        assert ctx.get_parameter_source(name).name == "DEFAULT_MAP", f"{key} is on the command line too"
        assert ctx.params[name] is value if isinstance(value, bool) else str(ctx.params[name]) == str(value), key


@pytest.mark.parametrize("path", ["params.yaml", *PRESETS])
def test_dvc_commands_resolve_to_each_stages_section(path, tmp_path, monkeypatch):
    """dvc.yaml as DVC resolves it with the preset as params.yaml: encode's and sample's commands, parsed
    by their own command lines, take every key of their section from --config params.yaml and only the
    items' facts as flags. The demo's encode records the command it had when every setting was a flag
    (the same flags in effect: the same cache)."""
    import shutil

    import typer
    import yaml
    from dvc.repo import Repo

    from preprocess.cli import app as prep_app
    from preprocess.encode_cli import recorded_command
    from sample.cli import app as sample_app
    from shared.params import config_flags
    shutil.copy(REPO / "dvc.yaml", tmp_path)
    shutil.copy(REPO / path, tmp_path / "params.yaml")
    Repo.init(str(tmp_path), no_scm=True)
    cmds = {stage.addressing.rsplit(":", 1)[-1]: stage.cmd for stage in Repo(str(tmp_path)).index.stages}
    params = yaml.safe_load((REPO / path).read_text())
    monkeypatch.chdir(tmp_path)
    encode = typer.main.get_command(prep_app).commands["encode"]
    for item in ("train", "val"):
        ctx, argv = _parsed(encode, cmds[f"encode@{item}"], "encode")
        assert (ctx.params["model"], ctx.params["input"], ctx.params["output"]) == \
            (params["model"]["path"], params["inputs"][item], params["train"]["data"][f"{item}_cache"])
        _assert_all_from_the_file(ctx, params["encode"])
        if path == "params.yaml" and item == "train":
            assert recorded_command(["flux-prep", *argv], config_flags(ctx)) == DEMO_ENCODE_COMMAND
    ctx, _ = _parsed(typer.main.get_command(sample_app), cmds["sample"], "flux-sample")
    trained = params["model"]["trained"]
    other = {"transformer": "lora", "lora": "transformer"}[trained]
    assert (ctx.params["model"], ctx.params[trained], ctx.params[other]) == \
        (params["model"]["path"], f"{params['train']['run']['output_dir']}/final", None)
    _assert_all_from_the_file(ctx, params["sample"])


@pytest.mark.parametrize("stage, package, not_run", [("train", "train", {"report.py"}),
                                                      ("sample", "sample", {"evaluate.py"})])
def test_stage_deps_are_the_code_it_runs(stage, package, not_run):
    """train/report.py and sample/evaluate.py are the metrics stage's: editing one must not rerun the
    training or the sampling; every other module of the package is a dependency (a new one too)."""
    import yaml
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    deps = set(stages[stage]["deps"])
    modules = {f"{package}/{p.name}" for p in (REPO / package).glob("*.py")}
    assert modules - {f"{package}/{n}" for n in not_run} <= deps, "a module the stage runs is not in its deps"
    assert not {f"{package}/{n}" for n in not_run} & deps and package not in deps
    assert {f"{package}/{n}" for n in not_run} <= set(stages["metrics"]["deps"])


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
    assert (params["encode"]["text_mode"], params["encode"]["text_max_length"], params["encode"]["resolution"]) == \
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
