"""The same tensors and metadata give the same safetensors bytes: the library writes metadata in hash-map order
(another order on every call), which changed the cache's sample-prompts file and every LoRA file on each run."""
import hashlib
import json

import torch
from safetensors.torch import load, save

from shared.family import get_family
from shared.run_files import write_lora_weights
from shared.safetensors_order import canonical

META = {"format": "pt", "prompts": json.dumps(["a red circle", "é"]), "t5_mode": "trimmed", "t5_max_length": "32"}
TENSORS = {"t5": torch.arange(6.0).view(2, 3), "t5_len": torch.tensor([3, 1]), "clip": torch.ones(2, 4)}


def test_the_librarys_own_bytes_vary_and_canonical_ones_do_not():
    raw = {save(TENSORS, metadata=META) for _ in range(8)}
    assert len(raw) > 1     # what this module is for: without it the bytes change from call to call
    fixed = {canonical(b) for b in raw}
    assert len(fixed) == 1
    data = fixed.pop()
    assert all(torch.equal(load(data)[k], v) for k, v in TENSORS.items())
    n = int.from_bytes(data[:8], "little")
    assert json.loads(data[8:8 + n])["__metadata__"] == META


def test_a_lora_file_has_the_same_bytes_on_every_write(tmp_path):
    adapter = {"transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 8),
               "transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(8, 4)}
    config = {"r": 4, "lora_alpha": 4, "target_modules": {"to_q", "to_k", "to_v"}}
    digests = {hashlib.sha256(write_lora_weights(get_family("flux1"), tmp_path / str(i), adapter, config)
                              .read_bytes()).hexdigest() for i in range(6)}
    assert len(digests) == 1
