"""What the trainer does differently under FSDP2 (accelerate's, configs/accelerate/fsdp.yaml), where each
rank holds only its shards of the parameters, gradients and optimizer state (DTensors)."""
from __future__ import annotations

from contextlib import nullcontext


def uses_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType
    return accelerator.distributed_type == DistributedType.FSDP


def micro_batch_sync(accelerator, model, last: bool):
    """The context of one micro-batch's forward and backward under gradient accumulation.

    DDP all-reduces once per optimizer step: no_sync on every micro-batch but the last. FSDP
    reduce-scatters on every micro-batch, so that each rank keeps only its shard of the gradient: under
    no_sync FSDP2 would hold each rank's whole unsharded gradient until the last micro-batch (a full
    fp32 gradient on every GPU), which is the memory that sharding exists to save. The price is one
    reduce-scatter per micro-batch instead of one per step."""
    if last or uses_fsdp(accelerator):
        return nullcontext()
    return accelerator.no_sync(model)


def trainable_weights(accelerator, model) -> dict:
    """{parameter name: whole tensor} of the trainable parameters only (the LoRA adapter, never the
    frozen base), on the main process. Under FSDP a collective that every rank must call: the shards are
    gathered to the main process's host memory, the other ranks get {}."""
    if uses_fsdp(accelerator):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                    ignore_frozen_params=True))
    unwrapped = accelerator.unwrap_model(model)
    return {n: p.detach() for n, p in unwrapped.named_parameters() if p.requires_grad}


def keep_lora_dtypes(accelerator) -> None:
    """Before prepare(), for LoRA under FSDP: every parameter is gathered in the dtype it is kept in (the
    frozen base bf16, the adapter fp32) and the adapter's gradients are reduced in fp32; the bf16
    compute comes from autocast (`autocast_forward`), as in one process or under DDP.

    accelerate's FSDP2 bf16 instead casts every parameter to bf16 and runs the whole model, norms and
    softmax included, in bf16, reducing in bf16: for the base, stored in bf16 already, that saves
    nothing, and the adapter is small, but its numerics would differ from one process's (Adam turns
    those differences into sign flips of the small gradients' updates)."""
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy
    if accelerator.mixed_precision != "no":
        accelerator.state.fsdp_plugin.mixed_precision_policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)


def autocast_forward(accelerator, model) -> None:
    """After prepare(): the model's forward under accelerate's autocast with fp32 outputs, as accelerate's
    prepare() does for one process and DDP (its FSDP2 path relies on the parameters' cast instead)."""
    from types import MethodType

    from accelerate.utils import convert_outputs_to_fp32, get_mixed_precision_context_manager
    if not accelerator.native_amp:
        return
    autocast = get_mixed_precision_context_manager(accelerator.native_amp, accelerator.autocast_handler)
    model._original_forward = model.forward
    model.forward = MethodType(convert_outputs_to_fp32(autocast(model.forward.__func__)), model)


def cast_inputs_on_recompute(accelerator, blocks, checkpointing: bool) -> None:
    """After prepare(), under FSDP2 with a parameter dtype (accelerate's bf16) and activation
    checkpointing: each block's floating inputs cast to that dtype by a pre-hook of our own, which also
    runs when the backward recomputes the block.

    FSDP2 casts a unit's inputs in its pre-forward hook, but torch before 2.13 skips that cast in the
    recompute: the recomputed block then gets the fp32 rotary embeddings where its forward got bf16
    ones, and torch.utils.checkpoint stops the backward ("Recomputed values ... have different
    metadata"; seen on torch 2.11 with the 2.55B model). Where FSDP did cast, this cast changes nothing."""
    if not (checkpointing and uses_fsdp(accelerator)):
        return
    policy = accelerator.state.fsdp_plugin.mixed_precision_policy
    dtype = getattr(policy, "param_dtype", None)
    if dtype is None or not policy.cast_forward_inputs:
        return
    for block in blocks:
        block.register_forward_pre_hook(floating_inputs_as(dtype), with_kwargs=True)


def floating_inputs_as(dtype):
    """A forward pre-hook (with_kwargs) that casts every floating tensor among the inputs to `dtype`."""
    import torch
    from torch.utils._pytree import tree_map

    def cast(x):
        return x.to(dtype) if isinstance(x, torch.Tensor) and torch.is_floating_point(x) else x

    def hook(module, args, kwargs):
        return tree_map(cast, args), tree_map(cast, kwargs)
    return hook
