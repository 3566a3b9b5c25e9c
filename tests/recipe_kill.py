"""Run recipes/textcls.py (or ner.py) in a subprocess and SIGKILL it at a chosen point; used by tests/test_recipe_resume.py.

    python tests/recipe_kill.py RECIPE WHERE [recipe options...]

WHERE is `none`, `step:N` (after optimizer step N), `save:N` (during the save of checkpoint-N, after the
model file, before the optimizer state) or `marker:N` (inside the completion marker write of checkpoint-N:
its temp file written, not yet renamed). The hooks patch transformers and os in this process only: the
recipe runs unchanged.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "recipes")]  # the worktree's ftkit and recipes

import transformers  # noqa: E402

from ftkit.reliability import MARKER  # noqa: E402


def kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class KillAtStep(transformers.TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            kill()


def arm(where: str) -> None:
    point, _, n = where.partition(":")
    step = int(n or 0)
    if point == "step":
        init = transformers.Trainer.__init__

        def with_kill(self, *args, callbacks=None, **kwargs):
            init(self, *args, callbacks=[*(callbacks or []), KillAtStep(step)], **kwargs)

        transformers.Trainer.__init__ = with_kill
    elif point == "save":
        save = transformers.Trainer._save_optimizer_and_scheduler

        def killed_save(self, output_dir):
            if self.state.global_step == step:
                kill()
            save(self, output_dir)

        transformers.Trainer._save_optimizer_and_scheduler = killed_save
    elif point == "marker":
        replace = os.replace

        def killed_replace(src, dst):
            if Path(dst).name == MARKER and Path(dst).parent.name == f"checkpoint-{step}":
                kill()  # the temp file is whole on disk; the marker never appears
            replace(src, dst)

        os.replace = killed_replace
    elif point != "none":
        raise SystemExit(f"unknown kill point {where!r}")


if __name__ == "__main__":
    recipe, where, *argv = sys.argv[1:]
    arm(where)
    importlib.import_module(recipe).main(argv)
