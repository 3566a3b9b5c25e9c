"""Crash-safe checkpoints, resume from the last complete one, and a NaN/Inf guard for `transformers.Trainer`.

A recipe uses these explicitly:

    trainer = Trainer(..., callbacks=[CrashSafeCheckpoints(), NonFiniteGuard()])
    trainer.train(resume_from_checkpoint=resume_checkpoint(data_args.resume, training_args.output_dir))

How a checkpoint becomes "complete": Trainer writes `checkpoint-N/` file by file. After the save (all ranks
done), `CrashSafeCheckpoints` fsyncs every file and the folder, then atomically writes `ftkit_complete.json`
(file names, sizes and sha256 checksums). `resolve_resume` only returns a checkpoint whose marker is present
and whose files still match it (sizes and checksums); anything else is skipped with a warning and never loaded. Exact resume itself (weights,
optimizer, scheduler, per-rank RNG states, data order) is Trainer's own; ftkit only makes sure that what
Trainer resumes from is whole. Each guarantee has a test in tests/test_reliability.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from ftkit import DataError

logger = logging.getLogger(__name__)

MARKER = "ftkit_complete.json"
MARKER_TMP = f".{MARKER}.tmp"  # the marker while it is written; a kill can leave it behind
# Files up to this size are hashed whole; larger ones (weights, optimizer state) by their first and last
# HASH_END bytes: that covers a safetensors header (tensor offsets) and a cut-off tail, at a cost that does
# not grow with the model (hashing whole optimizer states would add seconds to every save of a large model).
HASH_WHOLE = 16 << 20
HASH_END = 1 << 20
JIT_SENTINEL = "checkpoint-is-incomplete.txt"  # Trainer's `enable_jit_checkpoint` writes it during a save
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


class NonFiniteError(RuntimeError):
    """Training produced a NaN or infinite loss, gradient norm or weight; `step` is the optimizer step.

    A recipe exits with `exit_status` (3) for it, so a scheduler can tell divergence from other failures.
    """

    exit_status = 3

    def __init__(self, what: str, value: float, step: int, hint: str = "") -> None:
        self.what, self.value, self.step = what, value, step
        message = f"non-finite {what} ({value}) at step {step}"
        super().__init__(f"{message}; {hint}" if hint else message)


# ---- checkpoint folders ---------------------------------------------------------------------------------


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Return the `checkpoint-N` folders of `output_dir` sorted by step, oldest first (complete or not)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in root.iterdir() if (m := _CHECKPOINT_RE.match(p.name)) and p.is_dir()
    ]
    return [p for _, p in sorted(found)]


def file_checksum(path: Path) -> str:
    """sha256 of the file, or for files over `HASH_WHOLE` bytes of its first and last `HASH_END` bytes."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size <= HASH_WHOLE:
            digest.update(f.read())
        else:
            digest.update(f.read(HASH_END))
            f.seek(size - HASH_END)
            digest.update(f.read(HASH_END))
    return digest.hexdigest()


def incomplete_reason(checkpoint_dir: str | os.PathLike, checksums: bool = True) -> str | None:
    """Return why `checkpoint_dir` cannot be resumed from, or None if its completion marker checks out.

    Sizes are always compared; checksums too unless `checksums=False` (pruning, which runs at every save).
    """
    checkpoint = Path(checkpoint_dir)
    if (checkpoint / JIT_SENTINEL).exists():
        return f"{JIT_SENTINEL} (a SIGTERM checkpoint was interrupted)"
    try:
        marker = json.loads((checkpoint / MARKER).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"no {MARKER} (the save was interrupted)"
    except (OSError, ValueError) as err:
        return f"unreadable {MARKER}: {err}"
    for name, entry in marker.get("files", {}).items():
        # Markers written before checksums existed map each name to its size.
        size, checksum = (entry, None) if isinstance(entry, int) else (entry["size"], entry["sha256"])
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, the marker says {size}"
        if checksums and checksum is not None and file_checksum(path) != checksum:
            return f"{name} does not match its checksum (changed after the save)"
    return None


def resolve_resume(output_dir: str | os.PathLike) -> str | None:
    """Return the newest complete checkpoint in `output_dir`, or None (with a message) to start fresh.

    Newer incomplete checkpoints (a crash during a save, a save that ran out of disk) are skipped with a
    warning and never loaded. A missing or empty `output_dir` is not an error: training starts fresh.
    """
    checkpoints = list_checkpoints(output_dir)
    for checkpoint in reversed(checkpoints):
        reason = incomplete_reason(checkpoint)
        if reason is None:
            logger.info("Resuming from %s", checkpoint)
            return str(checkpoint)
        logger.warning("Skipping incomplete checkpoint %s: %s", checkpoint, reason)
    if checkpoints:
        logger.warning("No complete checkpoint in %s: starting fresh", output_dir)
    else:
        logger.warning("No checkpoint in %s: starting fresh", output_dir)
    return None


def resume_checkpoint(resume: str | None, output_dir: str | os.PathLike) -> str | None:
    """The checkpoint a recipe's `--resume` asks for: None (start fresh), "auto" (`resolve_resume`) or a path.

    An explicit path must be a complete checkpoint; otherwise `DataError` names it and says why.
    """
    if not resume:
        return None
    if resume == "auto":
        return resolve_resume(output_dir)
    reason = incomplete_reason(resume) if Path(resume).is_dir() else "not a folder"
    if reason:
        raise DataError(f"{resume}: cannot resume from this checkpoint: {reason}")
    return str(resume)


def _fsync(path: Path) -> None:
    # Folders are fsynced too: a file is only durable once the directory entry naming it is.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def mark_complete(checkpoint_dir: str | os.PathLike) -> None:
    """Flush every file of `checkpoint_dir` to disk, then atomically write its completion marker."""
    checkpoint = Path(checkpoint_dir)
    tmp = checkpoint / MARKER_TMP
    tmp.unlink(missing_ok=True)  # left by a kill inside an earlier marker write: not part of the checkpoint
    files = {}
    for path in sorted(checkpoint.rglob("*")):
        if path.is_file() and path.name != MARKER:
            _fsync(path)
            size = path.stat().st_size
            files[path.relative_to(checkpoint).as_posix()] = {"size": size, "sha256": file_checksum(path)}
    for folder in {p.parent for p in checkpoint.rglob("*")} | {checkpoint}:
        _fsync(folder)
    match = _CHECKPOINT_RE.match(checkpoint.name)
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"step": int(match.group(1)) if match else None, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, checkpoint / MARKER)  # atomic: the marker is either absent or whole
    _fsync(checkpoint)
    _fsync(checkpoint.parent)


def unmark(checkpoint_dir: str | os.PathLike) -> None:
    """Remove the completion marker (durably) so that `checkpoint_dir` no longer counts as resumable."""
    marker = Path(checkpoint_dir) / MARKER
    if marker.exists():
        marker.unlink()
        _fsync(marker.parent)


def prune_checkpoints(
    output_dir: str | os.PathLike, save_total_limit: int | None, best_checkpoint: str | None = None
) -> list[Path]:
    """Delete incomplete checkpoints and the oldest complete ones beyond `save_total_limit`.

    Keeps the newest complete checkpoint and `best_checkpoint` whatever the limit (as Trainer does), so at
    most max(save_total_limit, 2) folders remain. Call it only while no save is in progress. Returns the
    deleted folders.
    """
    checkpoints = list_checkpoints(output_dir)
    complete = [c for c in checkpoints if incomplete_reason(c, checksums=False) is None]
    doomed = [c for c in checkpoints if c not in complete]
    if save_total_limit is not None and save_total_limit > 0 and complete:
        protected = {complete[-1]} | ({Path(best_checkpoint)} if best_checkpoint else set())
        keep = max(save_total_limit, len(protected & set(complete)))
        extra = len(complete) - keep
        doomed += [c for c in complete if c not in protected][: max(extra, 0)]
    for checkpoint in doomed:
        # The marker goes first: a kill halfway through rmtree then leaves an incomplete folder, not a
        # "complete" one with files missing.
        unmark(checkpoint)
        shutil.rmtree(checkpoint, ignore_errors=True)
    return doomed


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


class CrashSafeCheckpoints(TrainerCallback):
    """Mark each checkpoint complete once all ranks have written it, and own checkpoint rotation.

    Why this callback takes over `save_total_limit`: Trainer deletes old checkpoints inside
    `_save_checkpoint`, before any callback runs. With `save_total_limit=1` a kill between that deletion
    and the marker would leave no complete checkpoint at all. So for the duration of `train()` the
    callback sets `args.save_total_limit` to None and prunes itself, after the marker is written
    (the limit is restored at the end of training). Disk use peaks at `save_total_limit` complete
    checkpoints + the one being written (+ the best one).
    """

    def __init__(self) -> None:
        self.save_total_limit: int | None = None
        self._train_began = 0.0
        self.start_epoch = 0.0  # where this train() began: after a resume, the checkpoint's epoch

    def on_train_begin(self, args, state, control, **kwargs):
        self._train_began = time.time()
        self.start_epoch = state.epoch or 0.0  # the checkpoint it resumes from may be pruned later
        if args.save_total_limit is not None:  # None here after a train() that raised: keep the first value
            self.save_total_limit = args.save_total_limit
        args.save_total_limit = None
        if args.should_save:
            # Checkpoints past the step we start from belong to an abandoned run: Trainer will write into
            # the same folder names, so their old markers must not vouch for half-overwritten files.
            for checkpoint in list_checkpoints(args.output_dir):
                step = int(_CHECKPOINT_RE.match(checkpoint.name).group(1))
                if step > state.global_step and (checkpoint / MARKER).exists():
                    logger.warning(
                        "%s is ahead of step %d: no longer resumable", checkpoint, state.global_step
                    )
                    unmark(checkpoint)

    def on_save(self, args, state, control, **kwargs):
        _barrier()  # every rank has written its files (rng_state_<rank>.pth) before rank 0 marks
        if args.should_save:
            mark_complete(Path(args.output_dir) / f"checkpoint-{state.global_step}")
            prune_checkpoints(args.output_dir, self.save_total_limit, state.best_model_checkpoint)
        _barrier()  # no rank starts the next save while rank 0 still prunes

    def on_train_end(self, args, state, control, **kwargs):
        if args.enable_jit_checkpoint:
            self._mark_jit_checkpoint(args)
        args.save_total_limit = self.save_total_limit

    def _mark_jit_checkpoint(self, args) -> None:
        # `enable_jit_checkpoint` saves on SIGTERM without calling on_save, then ends training. Its folder
        # is whole once Trainer removed the sentinel and wrote trainer_state.json (its last file); the
        # mtime check leaves alone unmarked leftovers of earlier runs.
        _barrier()
        if args.should_save:
            for checkpoint in list_checkpoints(args.output_dir):
                state_file = checkpoint / "trainer_state.json"
                if (
                    not (checkpoint / MARKER).exists()
                    and not (checkpoint / JIT_SENTINEL).exists()
                    and state_file.exists()
                    and state_file.stat().st_mtime >= self._train_began
                ):
                    mark_complete(checkpoint)
        _barrier()


class NonFiniteGuard(TrainerCallback):
    """Stop training with `NonFiniteError` at the first NaN/Inf gradient norm, logged loss or weight.

    - Gradients are checked every step just before the optimizer step, so non-finite gradients never
      reach the weights (Trainer's clipping would otherwise spread a NaN norm to every gradient).
    - Weights are checked before every save and evaluation and at the end of training: no checkpoint
      or final model with non-finite weights is written (a huge learning rate can overflow the weights
      with finite gradients).
    - The training loss is checked at every log. Trainer's `logging_nan_inf_filter` (on by default)
      replaces NaN losses by the running average (0.0 right after a log), so the guard turns it off.
    """

    def __init__(self) -> None:
        self._last_logged_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        args.logging_nan_inf_filter = False
        self._last_logged_step = state.global_step

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
        if math.isfinite(norm):
            return
        scaler = _loss_scaler(optimizer)
        if scaler is None:
            raise NonFiniteError(
                "gradient norm", norm, state.global_step + 1, "stopped before the optimizer applied it"
            )
        # fp16: an overflow is routine; the scaler skips this step and halves its scale. Only a scale
        # driven below MIN_LOSS_SCALE (gradients overflow even barely scaled) means the run diverged.
        if scaler.get_scale() < MIN_LOSS_SCALE:
            raise NonFiniteError(
                "gradient norm", norm, state.global_step + 1,
                f"the fp16 loss scale fell to {scaler.get_scale():g}: gradients overflow at any scale",
            )  # fmt: skip

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if control.should_save or control.should_evaluate:
            _check_weights(model, state.global_step)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if control.should_save or control.should_evaluate:
            _check_weights(model, state.global_step)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        _check_weights(model, state.global_step)

    def on_log(self, args, state, control, logs=None, optimizer=None, **kwargs):
        # With a loss scaler the logged grad_norm of an overflow step is inf by design (the step was skipped).
        for key in ("loss",) if _loss_scaler(optimizer) else ("loss", "grad_norm"):
            value = (logs or {}).get(key)
            if value is not None and not math.isfinite(value):
                span = f"averaged over steps {self._last_logged_step + 1}-{state.global_step}"
                raise NonFiniteError(f"training {key}", value, state.global_step, span)
        if logs and "loss" in logs:
            self._last_logged_step = state.global_step


# Below this fp16 loss scale an overflow is no longer the scaler probing upwards (it starts at 65536).
MIN_LOSS_SCALE = 1.0


def _loss_scaler(optimizer):
    """The enabled gradient scaler of an fp16 run (accelerate's optimizer wrapper holds it), else None."""
    scaler = getattr(optimizer, "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


def _check_weights(model: torch.nn.Module, step: int) -> None:
    from torch.distributed.tensor import DTensor

    found, sharded, device = None, False, None
    for name, param in model.named_parameters():
        weights = param.detach()
        if isinstance(weights, DTensor):  # FSDP2: each rank checks its own shard
            weights, sharded = weights.to_local(), True
        device = weights.device
        bad = weights[~torch.isfinite(weights)]
        if bad.numel():
            found = (f"weight {name}", float(bad[0]))
            break
    if sharded:  # the bad value sits in one rank's shard: every rank must stop, or the others hang
        flag = torch.tensor([float(found is not None)], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() and found is None:
            found = ("weight (in another rank's shard)", math.nan)
    if found:
        raise NonFiniteError(*found, step, "nothing was saved for this step")
