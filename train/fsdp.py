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
