"""Fault injection for the restart tests: the `longctx` command with one rank killed as a step begins.

    torchrun --nproc-per-node 2 --max-restarts 1 -m tests.kill_at_step STEP RANK train --config ...

Rank RANK kills itself with SIGKILL as step STEP (from 1) begins, before that step's forward, once per
run directory (a marker file `.test-killed` there stops the restarted worker from doing it again),
as a preempted node would. Production code holds no hook for this: `Trainer.train_step` is wrapped
here, then the command line runs as usual.
"""

import os
import signal
import sys

from longctx.cli import main
from longctx.train.trainer import Trainer

MARKER = ".test-killed"


def kill_at_step(step: int, rank: int) -> None:
    """Wrap `Trainer.train_step` so rank `rank` kills itself as step `step` begins."""
    train_step = Trainer.train_step

    def wrapped(self, batches):
        marker = self.run_dir / MARKER
        if self.step + 1 == step and self.dist.rank == rank and not marker.exists():
            marker.write_text(f"rank {rank} killed itself at step {step}\n")
            os.kill(os.getpid(), signal.SIGKILL)
        return train_step(self, batches)

    Trainer.train_step = wrapped


if __name__ == "__main__":
    kill_at_step(int(sys.argv[1]), int(sys.argv[2]))
    sys.exit(main(sys.argv[3:]))
