"""`training/run_stage.py` for the fault-injection test, under `accelerate launch`:

    _sigkill_run_stage.py <run_stage arguments> [--and-then <run_stage arguments> ...]

runs each argument list in turn in the same processes (paying the imports once), the last one with
process $DIANA_KILL_PROCESS killing itself by SIGKILL (no clean-up, no exception handler runs, as a
machine or the OOM killer would) when step $DIANA_KILL_STEP ends, before that step's checkpoint is saved.
"""

from __future__ import annotations

import os
import signal
import sys

from transformers import TrainerCallback

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from diana.training.run_stage import main  # noqa: E402

SEPARATOR = "--and-then"


class SigkillAtStep(TrainerCallback):
    def __init__(self, step: int, process_index: int):
        self.step = step
        self.process_index = process_index

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step and args.process_index == self.process_index:
            os.kill(os.getpid(), signal.SIGKILL)


def split_runs(argv: list[str]) -> list[list[str]]:
    runs: list[list[str]] = [[]]
    for arg in argv:
        if arg == SEPARATOR:
            runs.append([])
        else:
            runs[-1].append(arg)
    return runs


if __name__ == "__main__":
    *first, last = split_runs(sys.argv[1:])
    for argv in first:
        main(argv)
    main(last, callbacks=[SigkillAtStep(int(os.environ["DIANA_KILL_STEP"]), int(os.environ["DIANA_KILL_PROCESS"]))])
