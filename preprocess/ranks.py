"""The encode's processes as a launcher (accelerate launch, torchrun) starts them, and their barrier.

Ranks meet twice: before anything is written (so rank 0's sweep of temp files can only find a
killed earlier run's) and after every rank's done-records are written (so rank 0 alone writes the
manifest, without relying on a folder listing that a network file system may serve from a cache).
"""
from __future__ import annotations

import os
from datetime import timedelta

# A rank waits at the final barrier for the slowest rank's whole share: on a resumed run a rank may
# have nothing left to do while another encodes for hours. A rank that dies is reported by the
# launcher, which stops the others; the timeout only bounds a wait nobody would end.
BARRIER_TIMEOUT = timedelta(days=7)


class Ranks:
    """This process's rank, the world size and local rank, and a barrier across them (gloo: CPU only)."""

    def __init__(self):
        env = os.environ
        self.rank, self.world = int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))
        self.local_rank = int(env.get("LOCAL_RANK", 0))
        self._owns_group = False

    def start(self) -> None:
        """Join the launcher's process group (several ranks only)."""
        import torch.distributed as dist
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
            self._owns_group = True

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist
            dist.barrier()

    def from_rank0(self, value):
        """Rank 0's `value`, on every rank."""
        if self.world == 1:
            return value
        import torch.distributed as dist
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self._owns_group:
            import torch.distributed as dist
            dist.destroy_process_group()
            self._owns_group = False
