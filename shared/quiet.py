"""Silence the import-time noise of optional torchao (the `fp8` and `dev` extras).

With torchao installed, importing diffusers' models prints several warnings per process:
- torchao's CUDA extensions fail to load on a torch they were not built for;
- torch warns about Enums that torchao registers with pytree;
- diffusers says it cannot import torchao's tensor types.
None affects flux-prep: float8 training uses torchao's Python Float8Linear and torch's own
scaled matmul. Only these messages are dropped; other warnings of the same loggers still show.
"""
from __future__ import annotations

import logging

_NOISE = {
    "torchao": ("Failed to load ", "Skipping import of cpp extensions"),
    "torch.utils._pytree": ("is an Enum subclass and is now natively supported",),
    "diffusers.quantizers.torchao.torchao_quantizer": ("Unable to import `torchao` Tensor objects",),
}


class _DropMessages(logging.Filter):
    """Drops the records whose message contains any of `fragments`."""

    def __init__(self, fragments: tuple[str, ...]):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(f in message for f in self.fragments)


def quiet_torchao_imports() -> None:
    """Attach the filters (once per logger)."""
    for name, fragments in _NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(fragments))
