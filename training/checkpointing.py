"""What makes a resumed DiaNA run equal to an uninterrupted one, and a killed one leave no broken checkpoint.

Data order. The length-grouped sampler draws an epoch's order when that epoch's data loader is first
iterated: from torch's global generator (one process) or from the generator accelerate gives the sampler
(several processes, kept in step across processes), whose state runs on from epoch to epoch. A checkpoint's
`rng_state*.pth` holds the generators at the checkpoint's own step, which is the wrong state for drawing the
order of the epoch it falls in. So every checkpoint also keeps the random state of the start of the epoch a
resumed run continues (`epoch_start_rng_state[_<process>].pth`, this module's functions), and `DiaNATrainer`
restores it right before that epoch draws its order. A fresh run draws exactly as before: nothing is restored.

Checkpoint folders. Every process writes its part of a checkpoint under `tmp-checkpoint-<step>`, and the
saving process renames it to `checkpoint-<step>` once all parts are in (`publish_checkpoint`). A run killed
mid-save leaves at most a `tmp-` folder, which `get_last_checkpoint` does not match and the next save of the
run removes.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers.trainer_pt_utils import safe_globals
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

logger = logging.getLogger(__name__)

STAGING_PREFIX = f"tmp-{PREFIX_CHECKPOINT_DIR}-"
EPOCH_START_STATE_NAME = "epoch_start_rng_state"


def capture_random_state(sampler_generator: torch.Generator | None) -> dict[str, Any]:
    """The generators an epoch's order and draws come from: Python's, NumPy's, torch's CPU (and CUDA)
    global ones, and the sampler's own generator when it has one (None: it uses the global one)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "cpu": torch.random.get_rng_state(),
        "sampler": None if sampler_generator is None else sampler_generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.random.get_rng_state_all()
    return state


def restore_random_state(state: dict[str, Any], sampler_generator: torch.Generator | None, where: str) -> None:
    """Sets every generator `capture_random_state` recorded; `where` names the file in warnings."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.random.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        try:
            torch.cuda.random.set_rng_state_all(state["cuda"])
        except (RuntimeError, IndexError) as err:  # another number of devices than the saving run
            logger.warning("%s: CUDA random state not restored (%s); the resumed run may differ", where, err)
    if (state["sampler"] is None) != (sampler_generator is None):
        # One process draws from the global generator, several from the sampler's own: not the same run.
        logger.warning("%s was saved with %s sampler generator, this run has %s: the data order of the resumed "
                       "epoch may differ from the uninterrupted run's", where,
                       "no" if state["sampler"] is None else "a", "none" if sampler_generator is None else "one")
    elif sampler_generator is not None:
        sampler_generator.set_state(state["sampler"])


def epoch_start_state_path(checkpoint_dir: str | os.PathLike, process_index: int, world_size: int) -> str:
    """Per-process file name, like the Trainer's own `rng_state[_<process>].pth`."""
    suffix = f"_{process_index}" if world_size > 1 else ""
    return os.path.join(checkpoint_dir, f"{EPOCH_START_STATE_NAME}{suffix}.pth")


def save_epoch_start_state(state: dict[str, Any], path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(state, path)


def load_epoch_start_state(path: str) -> dict[str, Any] | None:
    """The saved state, or None for a checkpoint written without one."""
    if not os.path.isfile(path):
        return None
    with safe_globals():  # NumPy's generator state is an array
        return torch.load(path, weights_only=True)


def staging_checkpoint_dir(final_dir: str | os.PathLike) -> str:
    """`.../checkpoint-12` -> `.../tmp-checkpoint-12`: a name neither `get_last_checkpoint` nor the
    rotation of old checkpoints (both match `checkpoint-<step>`) ever takes for a checkpoint."""
    final_dir = Path(final_dir)
    return str(final_dir.parent / f"tmp-{final_dir.name}")


def remove_staging_leftovers(run_dir: str | os.PathLike) -> list[str]:
    """Deletes the `tmp-checkpoint-*` folders of saves that never finished; returns their paths."""
    leftovers = sorted(str(path) for path in Path(run_dir).glob(f"{STAGING_PREFIX}*") if path.is_dir())
    for path in leftovers:
        logger.warning("removing %s: a checkpoint whose writing was interrupted (never renamed to its final name)",
                       path)
        shutil.rmtree(path)
    return leftovers


def publish_checkpoint(staging_dir: str, final_dir: str) -> None:
    """Renames a complete staging folder to its final name (atomic on one file system). A folder already
    there (a resumed run saving a step again) is first moved aside under a staging name, so that a kill
    at any point leaves either the old or the new complete `checkpoint-<step>`, or none."""
    replaced = None
    if os.path.exists(final_dir):
        replaced = f"{staging_dir}.replaced"
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(final_dir, replaced)
    os.replace(staging_dir, final_dir)
    _fsync_directory(os.path.dirname(final_dir) or ".")
    if replaced is not None:
        shutil.rmtree(replaced)


def _fsync_directory(path: str) -> None:
    """Makes a rename durable (a power cut after it must not undo it); not possible on every platform."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_resumable(checkpoint: str | os.PathLike) -> None:
    """Refuses a folder `--resume_from_checkpoint` must not start from: an interrupted save's staging
    folder (`tmp-checkpoint-<step>`)."""
    name = Path(checkpoint).name
    if name.startswith(STAGING_PREFIX):
        raise ValueError(f"--resume_from_checkpoint {checkpoint}: a checkpoint whose writing was interrupted (it "
                         f"is renamed to {name[len('tmp-'):]} only when complete); resume from a complete "
                         "checkpoint-<step> folder or with `last`")
