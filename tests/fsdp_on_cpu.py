"""Run recipes/textcls.py under FSDP2 on CPU gloo ranks, for tests/test_scale_out.py (slow).

accelerate 1.15 enables FSDP only for GPU-class distributed types, and the recipes refuse an FSDP
launch elsewhere (ftkit.run.check_engine). This helper lifts both for a test: it tells accelerate the
CPU ranks are MULTI_GPU, so torch's fully_shard shards the model over gloo. That exercises ftkit's
own code on sharded (DTensor) weights: the NaN/Inf guard, crash-safe sharded checkpoints, resume,
and the final model gathered from every rank. It says nothing about FSDP's speed or memory on GPUs.

    accelerate launch --config_file recipes/accelerate/fsdp.yaml tests/fsdp_on_cpu.py RECIPE_ARGS
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "recipes"))
import accelerate.state  # noqa: E402
import textcls  # noqa: E402
from accelerate import PartialState  # noqa: E402
from accelerate.utils import DistributedType  # noqa: E402

import ftkit.run  # noqa: E402

accelerator_state_init = accelerate.state.AcceleratorState.__init__


def init_as_if_gpus(self, *args, **kwargs):
    shared = accelerate.state.PartialState._shared_state
    if shared.get("distributed_type") == DistributedType.MULTI_CPU:
        shared["distributed_type"] = DistributedType.MULTI_GPU
    accelerator_state_init(self, *args, **kwargs)


accelerate.state.AcceleratorState.__init__ = init_as_if_gpus
ftkit.run.check_engine = lambda training_args: None
try:
    textcls.main(sys.argv[1:])
finally:
    PartialState().destroy_process_group()
