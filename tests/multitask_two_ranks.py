"""Run recipes/multitask.py in one rank of a multi-process launch and record what this rank ended with.

Used by tests/test_multitask.py: `accelerate launch --multi_gpu --num_processes 2 tests/multitask_two_ranks.py ARGS`.
"""

import hashlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "recipes"))
import multitask  # noqa: E402
import transformers  # noqa: E402
from accelerate import PartialState  # noqa: E402

train = transformers.Trainer.train


def train_and_record(self, *args, **kwargs):
    out = train(self, *args, **kwargs)
    weights = b"".join(p.detach().cpu().numpy().tobytes() for p in self.model.parameters())
    record = {"world_size": self.args.world_size, "ddp": type(self.model_wrapped).__name__}
    record["find_unused_parameters"] = getattr(self.model_wrapped, "find_unused_parameters", None)
    record["weights"] = hashlib.sha256(weights).hexdigest()
    Path(self.args.output_dir, f"rank{os.environ['RANK']}.json").write_text(json.dumps(record))
    return out


transformers.Trainer.train = train_and_record
multitask.main(sys.argv[1:])
# As the recipes' __main__ does: close the process group before interpreter exit.
PartialState().destroy_process_group()
