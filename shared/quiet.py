"""Quiet the libraries underneath: notices that say nothing to a user, and, for --no-progress, their bars.

Dropped at import (`quiet_library_notices`, from shared/__init__), with optional torchao (the `fp8`
and `dev` extras) installed:
- torchao's CUDA extensions fail to load on a torch they were not built for;
- torch warns about Enums that torchao registers with pytree;
- diffusers says it cannot import torchao's tensor types.
None affects flux-prep: float8 training uses torchao's Python Float8Linear and torch's own scaled
matmul. And without torchvision, transformers says its image processors fall back to PIL ones: no
stage processes images through them. Diffusers warns at every `model.to(dtype)` (each sample render)
that the model has modules to keep in float32, listing none (`[]`): the Flux transformer has none.
Only these messages are dropped; other warnings of the same loggers (a list that is not empty) still show.
"""
from __future__ import annotations

import logging

_NOISE = {
    "torchao": ("Failed to load ", "Skipping import of cpp extensions"),
    "torch.utils._pytree": ("is an Enum subclass and is now natively supported",),
    "diffusers.quantizers.torchao.torchao_quantizer": ("Unable to import `torchao` Tensor objects",),
    "transformers.utils.import_utils": ("requires torchvision (not installed); falling back to",),
    "diffusers.models.modeling_utils": ("that should be kept in float32: []. ",),
}


class _DropMessages(logging.Filter):
    """Drops the records whose message contains any of `fragments`."""

    def __init__(self, fragments: tuple[str, ...]):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(f in message for f in self.fragments)


def quiet_library_notices() -> None:
    """Attach the filters (once per logger)."""
    for name, fragments in _NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(fragments))


def silence_progress_bars() -> None:
    """Turn off, for this process, the bars of the libraries that load and write models: transformers'
    "Loading weights" and "Writing model shards", diffusers' loading bars, huggingface_hub's downloads.
    (accelerate draws a bar only in load_checkpoint_in_model, which no stage calls.)"""
    import diffusers.utils.logging
    import huggingface_hub.utils
    import transformers.utils.logging
    huggingface_hub.utils.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()
