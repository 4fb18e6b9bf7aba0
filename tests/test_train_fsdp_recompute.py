"""FSDP2 with bf16 parameters and activation checkpointing: the recomputed block must see the inputs
its forward saw (train/fsdp.py cast_inputs_on_recompute; torch before 2.13 skips FSDP's input cast in
the recompute, and torch.utils.checkpoint then stops the backward). On the tiny model's real block."""
import pytest
import torch
from torch.utils.checkpoint import CheckpointError, checkpoint

from shared.presets import transformer_config
from train.fsdp import floating_inputs_as


def tiny_block():
    from diffusers import FluxTransformer2DModel
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**transformer_config("tiny"))
    return model, model.transformer_blocks[0]


def block_inputs(model, tokens=4, text=3):
    cfg = model.config
    dim = cfg.num_attention_heads * cfg.attention_head_dim
    g = torch.Generator().manual_seed(1)
    ids = torch.cat([torch.zeros(text, 3), torch.rand(tokens, 3, generator=g)])
    rotary = model.pos_embed(ids)     # fp32 cos, sin, as the model passes them to every block
    return (torch.randn(1, tokens, dim, generator=g), torch.randn(1, text, dim, generator=g),
            torch.randn(1, dim, generator=g), rotary)


def test_the_hook_casts_floating_inputs_and_leaves_the_rest():
    hook = floating_inputs_as(torch.bfloat16)
    args, kwargs = hook(None, (torch.ones(2), torch.arange(3), (torch.zeros(1), 5)), {"x": torch.ones(1)})
    assert args[0].dtype == torch.bfloat16 and args[1].dtype == torch.int64
    assert args[2][0].dtype == torch.bfloat16 and args[2][1] == 5 and kwargs["x"].dtype == torch.bfloat16


def fsdp_before_2_13(dtype):
    """What FSDP2's pre-forward hook did to a unit's inputs before torch 2.13: cast them in the
    forward, not when the backward recomputes the unit."""
    calls = []
    cast = floating_inputs_as(dtype)

    def hook(module, args, kwargs):
        calls.append(1)
        return cast(module, args, kwargs) if len(calls) == 1 else (args, kwargs)
    return hook


def checkpointed_backward(ours: bool) -> list:
    model, block = tiny_block()
    block.to(torch.bfloat16)
    # Under FSDP's bf16 the hidden states reach a block in bf16 (outputs of bf16 layers); the rotary
    # embeddings, computed in the root unit's forward, in fp32.
    *states, rotary = block_inputs(model)
    hidden, text, temb = (t.to(torch.bfloat16) for t in states)
    seen = []
    block.register_forward_pre_hook(fsdp_before_2_13(torch.bfloat16), with_kwargs=True)
    if ours:
        block.register_forward_pre_hook(floating_inputs_as(torch.bfloat16), with_kwargs=True)
    block.register_forward_pre_hook(lambda m, a, k: seen.append(a[3][0].dtype), with_kwargs=True)
    hidden.requires_grad_(True)
    out = checkpoint(block, hidden, text, temb, rotary, use_reentrant=False)
    sum(o.float().sum() for o in out).backward()     # recomputes the block
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()
    return seen


def test_without_the_cast_the_recompute_of_a_bf16_block_fails_as_on_torch_2_11():
    with pytest.raises(CheckpointError, match="different metadata"):
        checkpointed_backward(ours=False)


def test_with_the_cast_the_recompute_sees_the_inputs_its_forward_saw():
    assert checkpointed_backward(ours=True) == [torch.bfloat16, torch.bfloat16]   # forward, recompute
