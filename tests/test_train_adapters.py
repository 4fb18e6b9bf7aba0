"""The adapter kinds (lora.kind lokr | loha, lora.dora) on both families' tiny folders (CPU): each trains,
resumes to the same adapter, samples through `flux-sample --lora final/` as the trainer's own last sample
and as peft's own merge (PeftModel.merge_and_unload) of final/, and exports in LyCORIS's layout whose
delta weights, by LyCORIS's formulas as ComfyUI applies them, are peft's own (get_delta_weight); FLUX.2's
LoKr file also goes back through diffusers' own converter. Then block swap and the quantized base."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from preprocess.cli import app as prep_app
from sample.cli import app as sample_app
from shared.family import load_transformer
from shared.adapters import peft_config_of, read_adapter
from train.loop import Trainer

PROMPT = "a red circle on a black background"
SIZE, STEPS = 32, 3
PNG = "0000-a-red-circle-on-a-black-background-seed0.png"
# alpha 2 x rank: the scale is applied; LoKr of rank 2 keeps w2 as w2_a w2_b at the tiny sizes (rank 4 would
# make it a full matrix there, as peft does below half w2's size), so the exported alpha is read
KINDS = {"lokr": {"lora.kind": "lokr", "lora.rank": 2, "lora.alpha": 4}, "loha": {"lora.kind": "loha", "lora.alpha": 8},
         "dora": {"lora.dora": True, "lora.alpha": 8}}


def invoke(app, *args):
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output + repr(r.exception)
    return r


@pytest.fixture(scope="module")
def encoded(tiny_model, tiny_flux2_klein, tmp_path_factory):
    """{family: (model folder, cache with the sample prompt)}: 8 demo images, each family's tiny folder."""
    from preprocess.demo import write_demo_shards
    root = tmp_path_factory.mktemp("adapters")
    write_demo_shards(root / "raw", num_samples=8, size=SIZE, samples_per_shard=8, seed=0)
    (root / "prompts.txt").write_text(PROMPT + "\n")
    out = {}
    for family, model in (("flux1", tiny_model), ("flux2", tiny_flux2_klein)):
        invoke(prep_app, "encode", "--model", model, "--input", root / "raw", "--output", root / family,
               "--resolution", SIZE, "--batch-size", 8, "--num-workers", 0, "--dtype", "fp32", "--no-progress",
               "--sample-prompts", root / "prompts.txt")
        out[family] = (model, root / family)
    return out


def config(out, model, cache, **overrides):
    from train.config import load_config
    return load_config(None, {
        "data.train_cache": str(cache), "data.batch_size": 4, "data.num_workers": 0, "data.shuffle_buffer": 8,
        "model.name": str(model), "model.init": "pretrained", "lora.rank": 4, "run.precision": "bf16",
        "run.output_dir": str(out), "run.max_steps": 3, "run.checkpoint_every": 2, "run.log_every": 1,
        "run.tensorboard": False, "run.progress": False, "run.deterministic": True, "optim.lr": 5e-2,
        "flow.guidance_dropout": 0.0, "run.sample_every": 3, "run.sample_steps": STEPS, **overrides})


def image(path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(np.int16)


def peft_merged(model, final):
    """The base with final/'s adapter merged by peft's own PeftModel (its config from the file's metadata)."""
    from peft import PeftModel
    from peft.utils import set_peft_model_state_dict
    base = load_transformer(str(model), torch.float32, part="transformer")
    state, cfg = read_adapter(final / "pytorch_lora_weights.safetensors")
    wrapped = PeftModel(base, peft_config_of(cfg))
    loaded = set_peft_model_state_dict(wrapped, {f"base_model.model.{k}": v for k, v in state.items()})
    assert not loaded.unexpected_keys
    deltas = {n.removeprefix("base_model.model."): m.get_delta_weight("default") for n, m in wrapped.named_modules()
              if hasattr(m, "get_delta_weight") and hasattr(m, "base_layer")}
    return wrapped.merge_and_unload(), deltas


def lycoris_delta(tensors: dict, name: str) -> torch.Tensor:
    """A module's delta weight by LyCORIS's formulas as ComfyUI applies them (comfy/lora.py calculate_weight:
    loha (w1_a w1_b) * (w2_a w2_b) * alpha / rank(w1_b); lokr kron(w1, w2) * alpha / rank of the decomposed
    factor, 1 where both are full)."""
    t = {k.removeprefix(name + "."): v.float() for k, v in tensors.items() if k.startswith(name + ".")}
    alpha = t["alpha"].item() if "alpha" in t else None
    if "hada_w1_a" in t:
        return (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) * alpha / t["hada_w1_b"].shape[0]
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
    dim = t["lokr_w2_b"].shape[0] if "lokr_w2_b" in t else t["lokr_w1_b"].shape[0] if "lokr_w1_b" in t else None
    return torch.kron(w1, w2) * (alpha / dim if alpha is not None and dim else 1.0)


@pytest.mark.parametrize("family", ["flux1", "flux2"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_adapter_trains_resumes_samples_and_exports(kind, family, encoded, tmp_path):
    model, cache = encoded[family]
    run = tmp_path / "run"
    Trainer(config(run, model, cache, **KINDS[kind])).train()
    final = run / "final"
    adapter = load_file(final / "pytorch_lora_weights.safetensors")
    marker = {"lokr": ".lokr_w2_a", "loha": ".hada_w1_a", "dora": ".lora_magnitude_vector"}[kind]
    assert any(marker in k for k in adapter)

    # resumed from step 2's checkpoint: the same adapter, bit for bit
    shutil.copytree(run / "checkpoints/step-2", tmp_path / "resumed/checkpoints/step-2")
    Trainer(config(tmp_path / "resumed", model, cache, **KINDS[kind], **{"run.resume": "auto"})).train()
    resumed = load_file(tmp_path / "resumed/final/pytorch_lora_weights.safetensors")
    assert set(resumed) == set(adapter) and all(torch.equal(resumed[k], v) for k, v in adapter.items())

    # flux-sample --lora final/ renders the trainer's last sample, and peft's merge is the trainer's model
    invoke(sample_app, "--model", model, "--lora", final, "--prompt", PROMPT, "--seed", 0, "--steps", STEPS,
           "--width", SIZE, "--height", SIZE, "--output", tmp_path / "fs", "--no-progress")
    assert np.abs(image(tmp_path / "fs" / PNG) - image(run / "samples/step-3" / PNG)).max() <= 1
    merged, deltas = peft_merged(model, final)
    from shared.sampling import fuse_lora_adapter
    ours = load_transformer(str(model), torch.float32, part="transformer")
    fuse_lora_adapter(ours, str(final), "pytorch_lora_weights.safetensors", prefix="transformer")
    theirs = merged.state_dict()
    assert all(torch.allclose(v, theirs[k], atol=1e-6) for k, v in ours.state_dict().items())
    assert any(d.abs().max() > 1e-3 for d in deltas.values())   # it trained: the checks can fail
    if kind != "dora":   # `lora merge --scale 0.5` (shared/adapters.py): half of peft's delta (DoRA's is not linear)
        from shared.adapters import merge_adapter, safetensors_lora
        from shared.family import get_family
        base = load_transformer(str(model), torch.float32, part="transformer")
        before = {n: m.weight.detach().clone() for n, m in base.named_modules() if n in deltas}
        half = merge_adapter(base, safetensors_lora(final, "pytorch_lora_weights.safetensors"), get_family(family), 0.5)
        after = dict(half.named_modules())
        assert all(torch.allclose(after[n].weight - before[n], 0.5 * d, atol=1e-6) for n, d in deltas.items())

    file = tmp_path / "adapter.safetensors"
    if kind == "dora":
        r = CliRunner().invoke(prep_app, ["export", str(final), "--format", "comfyui", "--output", str(file)])
        assert r.exit_code != 0 and "--format diffusers" in r.output
        return
    invoke(prep_app, "export", final, "--format", "comfyui", "--output", file)
    exported = load_file(file)
    assert any(k.endswith(".alpha") for k in exported)
    from shared.lycoris import lycoris_name
    assert {k.rpartition(".")[0] for k in exported} == {lycoris_name(m) for m in deltas}
    for module, delta in deltas.items():
        assert torch.allclose(lycoris_delta(exported, lycoris_name(module)), delta.float(), atol=1e-6), module
    if (kind, family) == ("lokr", "flux2"):   # diffusers' own reader of LyCORIS FLUX.2 LoKr files
        from diffusers import Flux2KleinPipeline
        back = load_transformer(str(model), torch.float32, part="transformer")
        back.load_lora_adapter(Flux2KleinPipeline.lora_state_dict(str(file)), prefix="transformer")
        back.fuse_lora()
        back.unload_lora()
        assert all(torch.allclose(v, theirs[k], atol=1e-6) for k, v in back.state_dict().items())


QUANTIZED = {"lokr": "nf4", "loha": "int8", "dora": "float8"}   # each kind on one of the quantized bases


def adapter_weights(trainer) -> dict:
    model = trainer.accelerator.unwrap_model(trainer.model)
    return {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", list(KINDS))
def test_adapter_under_block_swap_trains_exactly_as_without_and_on_a_quantized_base(kind, encoded, tmp_path):
    pytest.importorskip("torchao", reason="quantized bases need torchao (the dev extra installs it)")
    for family, (model, cache) in encoded.items():
        short = {**KINDS[kind], "run.max_steps": 2, "run.checkpoint_every": 0, "run.sample_every": 0,
                 "run.grad_checkpointing": True}
        runs = {}
        for name, extra in (("plain", {}), ("swapped", {"run.offload_blocks": 1}),
                            ("quantized", {"model.quantize_base": QUANTIZED[kind], "run.grad_checkpointing": False})):
            trainer = Trainer(config(tmp_path / family / name, model, cache, **{**short, **extra}))
            start = adapter_weights(trainer)
            trainer.train()
            runs[name] = (start, adapter_weights(trainer))
        plain, swapped = runs["plain"][1], runs["swapped"][1]
        assert all(torch.equal(plain[k], swapped[k]) for k in plain), family
        start, end = runs["quantized"]
        assert all(v.isfinite().all() for v in end.values())
        assert any(not torch.equal(start[k], end[k]) for k in start), family   # the adapter trained


@pytest.mark.parametrize("overrides, key", [
    ({"lora.kind": "lokr", "lora.dora": True}, "lora.dora"),
    ({"lora.kind": "loha", "lora.lokr_factor": 4}, "lora.lokr_factor"),
    ({"lora.dora": True, "model.quantize_base": "nf4"}, "model.quantize_base nf4"),
    ({"lora.rank": 0, "lora.kind": "lokr", "run.precision": "no", "model.init": "random"}, "lora.rank"),
])
def test_adapter_options_that_do_not_go_together_are_refused_naming_the_keys(overrides, key, tmp_path):
    from shared.params import ConfigError
    with pytest.raises(ConfigError, match=key):
        config(tmp_path, "tiny", tmp_path / "cache", **{"run.sample_every": 0, **overrides})
