"""bench/memory.py --family flux2 on the CPU: every FLUX.2 row (plain loops, the trainer with each base and
block swap, full weights, the encoders) runs end to end at toy size and writes its result as it ends; a
call out of time leaves the rest for the next; the real rows' trainer configs are valid and their goals
name real rows; the model FLOPs of Flux2Transformer2DModel count each weight with the tokens through it.
The figures themselves are the GPU's (the command in bench/memory.py's docstring)."""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"

# Loaded by path: bench/ on sys.path would shadow the `sample` package with bench/sample.py.
_spec = importlib.util.spec_from_file_location("bench_memory", BENCH / "memory.py")
memory = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(memory)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Every row of the FLUX.2 `all` suite at toy size, in this process."""
    root = tmp_path_factory.mktemp("flux2-bench")
    results = memory.main(["--family", "flux2", "--suite", "all", "--device", "cpu", "--tiny", "--same-process",
                           "--root", str(root / "state"), "--out", str(root / "out")])
    return results, root / "out"


def by_name(results):
    return {r["name"]: r for r in results}


def test_every_row_runs_and_is_written_as_it_ends(tiny_run):
    results, out = tiny_run
    names = [r["name"] for r in memory.rows("all", False, "flux2")]
    assert [r["name"] for r in results] == names
    compiled = [r["name"] for r in results if r.get("config", {}).get("run.compile")]
    assert compiled and all(r["error"] == "skipped: run.compile rows run on CUDA only"
                            for r in results if r["name"] in compiled)   # issue 29's rows: the GPU's
    assert [r["name"] for r in results if "error" in r and r["name"] not in compiled] == []
    for r in results:
        if r["name"] in compiled:
            continue
        assert r["img_s"] > 0 and r["host_peak_rss_gib"] > 0
        if not r["kind"].startswith("encode"):
            assert r["flops_per_image"] > 0 and len(r["losses"]) == r["warmup"] + r["steps"]
            assert all(math.isfinite(x) for x in r["losses"])
    files = sorted((out / "rows").glob("*.json"))
    assert [json.loads(f.read_text())["name"] for f in files] == [n for n in names if n not in compiled]
    assert [r["name"] for r in json.loads((out / "results.json").read_text())["rows"]] == names
    table = (out / "table.txt").read_text()
    assert all(n in table for n in names) and "<=6 GiB" in table


def test_plain_loops_train_what_the_trainer_trains(tiny_run):
    rows = by_name(tiny_run[0])
    # the peft adapter of the plain loop on FLUX.2's targets: the trainer's adapter, parameter for parameter
    assert rows["klein-4B LoRA: plain loop, bf16 base"]["trainable"] == rows["klein-4B LoRA: bf16 base"]["trainable"]
    assert rows["dev LoRA: plain loop, bf16 base"]["trainable"] == rows["dev LoRA: bf16 base"]["trainable"]
    full = rows["klein-4B full: adafactor in backward"]["trainable"]
    assert full == rows["klein-4B full: plain loop, adafactor in backward"]["trainable"] > 0
    # every block swapped ("all") computes exactly what the unswapped base does
    swapped = rows["dev LoRA: bf16 base, every block swapped"]
    assert swapped["losses"] == rows[swapped["same_as"]]["losses"]


def test_encode_rows_time_text_and_latents(tiny_run):
    rows = by_name(tiny_run[0])
    for name in ("klein-4B encode: plain Flux2KleinPipeline loop", "klein-4B encode: flux-prep Encoders"):
        assert rows[name]["text_img_s"] > 0 and rows[name]["vae_img_s"] > 0
    assert rows["dev encode: Mistral 24B text, flux-prep's path"]["img_s"] > 0


def test_a_call_out_of_time_leaves_the_rest_for_the_next(tmp_path):
    only = ["--only", "klein-4B LoRA: plain loop, bf16 base;klein-4B full: plain loop, adafactor in backward"]
    base = ["--family", "flux2", "--suite", "all", "--device", "cpu", "--tiny", "--same-process", *only]
    first = memory.main([*base, "--root", str(tmp_path / "a"), "--budget", "0", "--out", str(tmp_path / "o1")])
    assert "error" not in first[0] and first[1]["not_run"]
    assert len(list((tmp_path / "o1" / "rows").glob("*.json"))) == 1
    again = memory.main([*base, "--root", str(tmp_path / "a"), "--resume"])
    assert again[0] == first[0] and "error" not in again[1]          # the first row kept, the second run
    # on a fresh machine: the rows of the results.json an earlier call returned
    moved = memory.main([*base, "--root", str(tmp_path / "b"), "--budget", "0",
                         "--resume-from", str(tmp_path / "o1" / "results.json")])
    assert moved[0] == first[0] and "error" not in moved[1]


def test_a_row_runs_in_a_process_of_its_own(tmp_path):
    """The device's way: each row in a subprocess, its result read back from the line it prints."""
    r = subprocess.run([sys.executable, str(BENCH / "memory.py"), "--family", "flux2", "--suite", "lora", "--tiny",
                        "--device", "cpu", "--only", "dev LoRA: plain loop, bf16 base", "--root", str(tmp_path),
                        "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    row = json.loads((tmp_path / "out" / "results.json").read_text())["rows"][0]
    assert "error" not in row and row["img_s"] > 0 and row["overrides"] == {"guidance_embeds": True}


def test_real_rows_are_valid_trainer_configs_with_goals_of_real_rows(tmp_path):
    from train.config import load_config
    rows = memory.rows("all", False, "flux2")
    names = {r["name"] for r in rows}
    blocks = {}
    for r in rows:
        assert not r.get("tiny") and r["est_s"] > 0
        assert (r.get("goal") or {}).get("img_s_of", r["name"]) in names
        assert r.get("same_as", r["name"]) in names
        if r["kind"] == "trainer":
            cfg = load_config(None, memory.trainer_settings(r, tmp_path / "cache", tmp_path / "work"))
            assert cfg.model.name == r["preset"] and cfg.run.grad_checkpointing
            assert cfg.run.precision == ("fp8" if "fp8" in r["name"] else "bf16")
            blocks[r["name"]] = cfg.run.offload_blocks
    assert blocks["dev LoRA: bf16 base, every block swapped"] == 8 + 48
    assert blocks["dev full 512px: adafactor in backward, every block swapped"] == 8 + 48
    assert max(r["est_s"] for r in rows) <= 9 * 60   # each row fits one 10-minute device call (--resume spans calls)


@pytest.mark.parametrize("preset", ["flux2-klein-4b", "flux2-dev"])
def test_flux2_flops_count_each_weight_with_its_tokens(preset):
    """bench/flops.py on Flux2Transformer2DModel (meta device) against the sizes written out from its config:
    double blocks' image and text streams (q, k, v, out; SwiGLU in and out), single blocks' fused
    to_qkv_mlp_proj and to_out over the joint sequence, no biases; the modulation and time/guidance layers
    see one row per image."""
    from diffusers import Flux2Transformer2DModel

    from flops import linear_flops_per_image
    from shared.family import get_family
    from shared.presets import transformer_config
    cfg = transformer_config(preset)
    with torch.device("meta"):
        model = Flux2Transformer2DModel(**cfg)
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    m = int(d * cfg["mlp_ratio"])
    stream = 4 * d * d + 3 * d * m        # attention projections + SwiGLU (in: d -> 2m, out: m -> d)
    single = d * (3 * d + 2 * m) + (d + m) * d
    per_sample = (256 * d + d * d) * (2 if cfg["guidance_embeds"] else 1) + (6 + 6 + 3 + 2) * d * d
    img, txt = 4096, 512
    expected = 6 * (img * (cfg["num_layers"] * stream + 2 * cfg["in_channels"] * d)
                    + txt * (cfg["num_layers"] * stream + cfg["joint_attention_dim"] * d)
                    + (img + txt) * cfg["num_single_layers"] * single + per_sample)
    counted = linear_flops_per_image(model, img, txt, get_family("flux2").per_sample_layer)
    assert counted == expected


# -- the edit suite (issue 27): [klein] 4B LoRA with two references ----------------------------------------------
# the plain loop and an 8-bit base (the bf16 and float8 rows take the same paths; their configs are checked below)
KLEIN_TINY = ["klein-4B edit LoRA: plain loop, bf16 base", "klein-4B edit LoRA: int8 base"]


def test_klein_edit_rows_run_tiny_with_two_references(tmp_path):
    """`--family flux2 --suite edit`'s rows at toy size: the trainer's on a cache with two references per row."""
    results = memory.main(["--family", "flux2", "--suite", "edit", "--device", "cpu", "--tiny", "--same-process",
                           "--only", ";".join(KLEIN_TINY), "--root", str(tmp_path / "state")])
    rows = by_name(results)
    assert [r["name"] for r in results] == KLEIN_TINY
    for r in results:
        assert "error" not in r, r.get("error")
        assert r["img_s"] > 0 and all(math.isfinite(x) for x in r["losses"])
        if r["kind"] == "trainer":
            assert (r["model_family"], r["references"]) == ("flux2", 2)
    assert rows[KLEIN_TINY[0]]["trainable"] == rows[KLEIN_TINY[1]]["trainable"] > 0


def test_klein_plain_loop_places_references_as_the_family_does():
    """Flux2KleinPipeline's helpers (the plain loop) against the family's placement (Flux2.predict's ids):
    references after the noisy tokens at t = 10, 20; the target covers the noisy tokens only."""
    from shared.family import get_family
    row = memory.rows("edit", True, "flux2")[0]
    batch = memory.plain_batch(row, memory.model_config(row), torch.device("cpu"))
    hw = row["res"] // 8
    n = (hw // 2) ** 2
    assert batch["hidden_states"].shape[1] == 3 * n and batch["target"].shape[1] == n
    family = get_family("flux2")
    expected = torch.cat([family.image_ids(hw, hw)] + [family.reference_ids(hw, hw, i) for i in range(2)])
    assert torch.equal(batch["img_ids"].reshape(-1, 4).long(), expected.reshape(-1, 4).long())


def test_real_klein_edit_rows_are_valid_trainer_configs(tmp_path):
    from train.config import load_config
    rows = memory.rows("edit", False, "flux2")
    names = {r["name"] for r in rows}
    assert set(KLEIN_TINY) < names
    quantized = set()
    for r in rows:
        assert (r["res"], r["refs"], r["preset"]) == (1024, 2, "flux2-klein-4b") and not r.get("tiny")
        assert r.get("goal", {}).get("img_s_of", r["name"]) in names
        if r["kind"] == "trainer":
            cfg = load_config(None, memory.trainer_settings(r, tmp_path / "cache", tmp_path / "work"))
            assert cfg.lora.rank == 16 and cfg.run.grad_checkpointing
            if cfg.model.quantize_base != "none":
                quantized.add(cfg.model.quantize_base)
                assert r["goal"]["peak_gib"] == 8
    assert "int8" in quantized
    assert sum(r["est_s"] for r in rows) <= 480    # the lead's one call: --budget 480
