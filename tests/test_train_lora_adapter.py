"""write_lora_adapter, the one writer of the trainer's LoRA files (one process and FSDP alike), writes
what diffusers' save_lora_adapter writes from the model itself (the same tensors and adapter config), under
the "transformer." prefix that FluxPipeline.load_lora_weights looks for."""
import json

import torch
from safetensors import safe_open

from train.checkpoint import write_lora_adapter
from train.config import LoraConfig, ModelConfig
from shared.family.flux1 import FLUX1
from train.model import add_lora, build_transformer


def read(path) -> tuple[dict, dict]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_write_lora_adapter_writes_what_save_lora_adapter_writes(tmp_path):
    model = build_transformer(ModelConfig(name="tiny"), dtype=torch.bfloat16)
    add_lora(model, LoraConfig(rank=4, alpha=8), FLUX1)
    with torch.no_grad():   # B starts at zero: give every tensor its own values
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    weights = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    write_lora_adapter(model, weights, tmp_path / "ours")
    model.save_lora_adapter(str(tmp_path / "diffusers"))
    ours, ours_meta = read(tmp_path / "ours/pytorch_lora_weights.safetensors")
    theirs, theirs_meta = read(tmp_path / "diffusers/pytorch_lora_weights.safetensors")
    config = json.loads(theirs_meta["lora_adapter_metadata"])
    assert json.loads(ours_meta["lora_adapter_metadata"]) == {f"transformer.{k}": v for k, v in config.items()}
    assert config["lora_alpha"] == 8 and ours_meta["format"] == "pt"
    assert set(ours) == {f"transformer.{k}" for k in theirs} and len(ours) == len(weights)
    assert all(torch.equal(ours[f"transformer.{k}"], v) and v.dtype == torch.float32 for k, v in theirs.items())


def _old_checkpoint(step) -> None:
    """Rewrite a checkpoint's adapter as checkpoints held it before final/'s format: bare peft keys."""
    from safetensors.torch import load_file, save_file
    new = step / "pytorch_lora_weights.safetensors"
    save_file({k.removeprefix("transformer."): v for k, v in load_file(new).items()},
              str(step / "lora_adapter.safetensors"))
    new.unlink()


def test_lora_run_resumes_from_its_checkpoint_either_format_to_the_same_adapter(tmp_path):
    from safetensors.torch import load_file
    from train_caches import tiny_config, write_cache

    from train.loop import train
    cache = write_cache(tmp_path / "cache", 8)
    settings = {"run.max_steps": 4, "run.checkpoint_every": 2, "lora.rank": 4, "run.precision": "bf16",
                "run.deterministic": True, "optim.lr": 1e-2}
    train(tiny_config(tmp_path / "full", cache, **settings))
    expected = load_file(tmp_path / "full/run/final/pytorch_lora_weights.safetensors")
    for name, rewrite in (("new", None), ("old", _old_checkpoint)):
        train(tiny_config(tmp_path / name, cache, **settings), stop_after_step=3)
        at_step_2 = read(tmp_path / name / "run/checkpoints/step-2/pytorch_lora_weights.safetensors")[0]
        assert any(not torch.equal(at_step_2[k], v) for k, v in expected.items())   # it moved after step 2
        if rewrite:
            rewrite(tmp_path / name / "run/checkpoints/step-2")
        train(tiny_config(tmp_path / name, cache, **settings, **{"run.resume": "auto"}))
        got = load_file(tmp_path / name / "run/final/pytorch_lora_weights.safetensors")
        assert set(got) == set(expected) and all(torch.equal(got[k], v) for k, v in expected.items()), name
