"""Preemption and time limits: a signal sets a flag, the training loop acts on it.

The handler does nothing but record the signal: saving from inside a signal handler
would interrupt a collective or a half-written checkpoint. At every step boundary the
loop calls :meth:`Preemption.agreed`, one all-reduce of the flag, so every rank stops at
the same step (a signal may reach the ranks at different moments, or rank 0 only). The
loop then saves a complete checkpoint and calls :meth:`Preemption.exit`.

Two signals, two meanings:

- the configured one (``train.preempt_signal``, USR2 by default, what submitit and
  ``#SBATCH --signal`` send ahead of the time limit): save, requeue, exit;
- SIGTERM (SLURM at the time limit, on ``scancel``, and when it preempts or requeues a
  job itself): save and exit, no requeue of our own; a job SLURM requeues comes back.

Requeue under SLURM is ``scontrol requeue $SLURM_JOB_ID`` from rank 0: the same job id,
the same submitted command (submitit re-runs the same pickled call, so Hydra composes
the same run directory), and the run resumes from its newest complete checkpoint with
the same wandb id (both derived from the run directory). This replaces submitit's own
USR2 handler, which runs ``checkpoint()`` on global rank 0 only, at any point of a step.
Outside SLURM the process exits with :data:`REQUEUE_EXIT` and relaunching resumes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from ablate import dist

REQUEUE_EXIT = 75
"""Exit status after a save for a requeue (EX_TEMPFAIL: try again, it will resume)."""


class Preemption:
    def __init__(self, signal_name: str = "USR2"):
        self.requeue_signal = signal.Signals["SIG" + signal_name.upper().removeprefix("SIG")]
        self.received: set[int] = set()
        for sig in {self.requeue_signal, signal.SIGTERM}:
            try:
                signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: leave the process's handlers alone
                pass

    def _handler(self, signum: int, frame) -> None:
        self.received.add(signum)
        print(f"[ablate] caught {signal.Signals(signum).name}: saving at the next step boundary",
              file=sys.stderr, flush=True)

    def agreed(self) -> tuple[bool, bool]:
        """(stop, requeue), the same on every rank: any rank's signal counts."""
        stop, requeue = dist.reduce_over_ranks(
            [bool(self.received), self.requeue_signal in self.received], mean=[False, False])
        return stop > 0, requeue > 0

    def exit(self, step: int, requeue: bool, is_main: bool) -> None:
        """Leave the process after the checkpoint of ``step`` is complete."""
        job = os.environ.get("SLURM_JOB_ID")
        if requeue and job and is_main:
            r = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            print(f"[ablate] scontrol requeue {job}: {'ok' if r.returncode == 0 else r.stderr.strip()}",
                  file=sys.stderr, flush=True)
        if is_main:
            print(f"[ablate] stopped at step {step} with a complete checkpoint; "
                  f"{'requeued' if requeue else 'relaunch to resume'}", flush=True)
        sys.exit(REQUEUE_EXIT)
