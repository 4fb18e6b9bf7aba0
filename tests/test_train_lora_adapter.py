"""write_lora_adapter, the one writer of the trainer's LoRA files (one process and FSDP alike), writes
what diffusers' save_lora_adapter writes from the model itself (the same tensors and adapter config), under
the "transformer." prefix that FluxPipeline.load_lora_weights looks for."""
import json

import torch
from safetensors import safe_open

from train.checkpoint import write_lora_adapter
from train.config import LoraConfig, ModelConfig
from train.model import add_lora, build_transformer


def read(path) -> tuple[dict, dict]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_write_lora_adapter_writes_what_save_lora_adapter_writes(tmp_path):
    model = build_transformer(ModelConfig(name="tiny"), dtype=torch.bfloat16)
    add_lora(model, LoraConfig(rank=4, alpha=8))
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
