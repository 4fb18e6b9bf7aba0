"""The trainer's command line under accelerate's FSDP2 in CPU processes over gloo, for the tests:

    ACCELERATE_USE_CPU=1 accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2 \\
        tests/fsdp_cpu_train.py --config CONFIG.yaml

accelerate (1.15, 1.16) picks FSDP only for GPU-type processes: in CPU processes it sets up gloo and
then ignores the FSDP plugin of the config file, and the run silently becomes DDP (accelerate/state.py:
the FSDP branch sits under the MULTI_GPU/MULTI_XPU/... distributed types). torch's FSDP2 itself runs
on CPU over gloo. This wrapper makes accelerate take its FSDP branch once it has set up the processes,
with the plugin it reads from the launcher's FSDP_* settings as usual, then runs `train` unchanged:
prepare(), fully_shard, clipping, save_state/load_state and get_state_dict are accelerate's own.
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def use_fsdp_on_cpu() -> None:
    import accelerate
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    init = accelerate.Accelerator.__init__

    def init_with_fsdp(self, *args, **kwargs):
        init(self, *args, **kwargs)
        state = self.state
        if state.distributed_type != DistributedType.MULTI_CPU or os.environ.get("ACCELERATE_USE_FSDP") != "true":
            return
        plugin = kwargs.get("fsdp_plugin") or FullyShardedDataParallelPlugin()
        if state.mixed_precision != "no":
            plugin.set_mixed_precision(state.mixed_precision)
        state.fsdp_plugin = plugin
        state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    accelerate.Accelerator.__init__ = init_with_fsdp


if __name__ == "__main__":
    use_fsdp_on_cpu()
    from train.cli import main
    main()
