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

Requeues are capped (``train.max_requeues``): a job that is signalled again and again
(a time limit too short for even one checkpoint interval, a signal sent too early, a
partition that preempts it forever) would otherwise cycle without end. SLURM counts the
restarts of a job in ``SLURM_RESTART_COUNT`` (absent on the first run); at the cap the
signal still saves a complete checkpoint, but the job ends instead of requeueing, with a
message saying so and how to go on (submit the same command again: it resumes).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from ablate import dist

REQUEUE_EXIT = 75
"""Exit status after a save for a requeue (EX_TEMPFAIL: try again, it will resume)."""


def restarts() -> int:
    """How many times SLURM has restarted (requeued) this job; 0 outside SLURM."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    except ValueError:
        return 0


class Preemption:
    def __init__(self, signal_name: str = "USR2", max_requeues: int = 20):
        self.requeue_signal = signal.Signals["SIG" + signal_name.upper().removeprefix("SIG")]
        self.max_requeues = max_requeues
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
        capped = bool(requeue and job and restarts() >= self.max_requeues)
        if capped:
            requeue = False
            if is_main:
                print(f"[ablate] NOT requeueing job {job}: it was already requeued {restarts()} times "
                      f"(train.max_requeues={self.max_requeues}). The checkpoint of step {step} is "
                      f"complete; submit the same command again to resume from it.",
                      file=sys.stderr, flush=True)
        if requeue and job and is_main:
            r = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            print(f"[ablate] scontrol requeue {job}: {'ok' if r.returncode == 0 else r.stderr.strip()}",
                  file=sys.stderr, flush=True)
        if is_main:
            then = "requeued" if requeue else ("requeue cap reached" if capped else "relaunch to resume")
            print(f"[ablate] stopped at step {step} with a complete checkpoint; {then}", flush=True)
        sys.exit(REQUEUE_EXIT)
