"""Stopping cleanly when the scheduler says so: checkpoint at the next step, requeue, resume.

Two signals, two meanings (names from ``run.requeue_signal`` / ``run.stop_signal``):

* the *requeue* signal (SIGUSR1; ``sbatch --signal=USR1@180`` sends it 180 s before the time limit, and
  ``scancel --signal=USR1 <job>`` by hand): every rank finishes its optimizer step, a complete checkpoint is
  written, rank 0 runs ``scontrol requeue $SLURM_JOB_ID`` and the processes exit with ``PREEMPTED_EXIT_CODE``.
  The requeued job runs the same command, which resumes from that checkpoint.
* the *stop* signal (SIGTERM: what ``scancel``, Slurm preemption and the time limit send, ``KillWait``
  seconds before SIGKILL): the same checkpoint, no requeue -- a cancelled job stays cancelled; a job
  preempted with ``PreemptMode=REQUEUE`` is requeued by Slurm itself.

Ranks may receive a signal at different steps (or only some of them at all), so at every optimizer step the
ranks agree with one all-reduce of two flags; all of them stop after the same step. A signal that arrives
while a checkpoint is written, or during validation, is acted on at the next step. Forked DataLoader workers
ignore the signals (``iterate`` starts them so; their parent shuts them down), so a signal Slurm delivers to
every process of the step does not kill a worker under the loader.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
from dataclasses import dataclass
from typing import Optional

from engine.dist import any_rank

log = logging.getLogger(__name__)

# EX_TEMPFAIL: "try again later" -- what a run that stopped to be resumed exits with.
PREEMPTED_EXIT_CODE = 75


def parse_signal(name: str) -> Optional[signal.Signals]:
    """``"SIGUSR1"``, ``"USR1"`` or ``"usr1"`` -> signal.SIGUSR1; ``""`` -> None (disabled)."""
    if not name:
        return None
    key = name.upper()
    key = key if key.startswith("SIG") else "SIG" + key
    if key in ("SIGKILL", "SIGSTOP"):
        raise ValueError(f"{key} cannot be caught; use SIGUSR1, SIGUSR2 or SIGTERM")
    if key not in signal.Signals.__members__:
        raise ValueError(f"unknown signal {name!r}; one of: {', '.join(sorted(signal.Signals.__members__))}")
    return signal.Signals[key]


@dataclass(frozen=True)
class StopRequest:
    """What the ranks agreed to do after the current step."""

    requeue: bool  # a requeue signal arrived on some rank (a requeue wins over a plain stop)
    signal_name: str  # for the log


class PreemptionGuard:
    """Records the requeue / stop signals in this process; ``poll`` turns them into a decision all ranks share."""

    def __init__(self, requeue_signal: str = "SIGUSR1", stop_signal: str = "SIGTERM"):
        self.requeue_signal = parse_signal(requeue_signal)
        self.stop_signal = parse_signal(stop_signal)
        if self.requeue_signal is not None and self.requeue_signal == self.stop_signal:
            raise ValueError(f"requeue and stop signals are both {self.requeue_signal.name}")
        self.received: list[signal.Signals] = []
        self._owner = os.getpid()
        self._previous: dict[signal.Signals, object] = {}

    @property
    def signals(self) -> list[signal.Signals]:
        return [s for s in (self.requeue_signal, self.stop_signal) if s is not None]

    def install(self) -> "PreemptionGuard":
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._owner:
            return  # a forked DataLoader worker: the training process decides
        sig = signal.Signals(signum)
        if sig not in self.received:
            self.received.append(sig)
            log.warning("received %s: the run will checkpoint after the current step%s", sig.name,
                        " and requeue" if sig == self.requeue_signal else "")

    def poll(self) -> Optional[StopRequest]:
        """Whether any rank received a signal, decided identically on every rank (a collective when there is
        a process group of more than one rank: call it at the same step on all of them).

        The flags travel through the CPU (gloo) group (``engine.dist.cpu_group``): an all-reduce of GPU tensors
        read back on the host would make every step wait for the GPU to drain."""
        if not self.signals:
            return None
        requeue, stop = any_rank([self.requeue_signal in self.received, self.stop_signal in self.received])
        if not (requeue or stop):
            return None
        name = self.requeue_signal.name if requeue else self.stop_signal.name
        return StopRequest(requeue=requeue, signal_name=name)


def requeue_slurm_job(env=os.environ) -> str:
    """Put this Slurm batch job back in the queue (``scontrol requeue``); returns what happened, for the log.

    Slurm then ends the running allocation (the checkpoint is already complete) and starts the same batch
    script again when resources allow (Slurm holds a requeued job for about two minutes first). The sbatch
    script needs ``--requeue`` where the cluster's ``JobRequeue`` default is 0, and ``--open-mode=append`` to
    keep the log of the earlier runs.
    """
    job_id = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
    if not job_id:
        return "not a Slurm job: nothing requeued; run the same command again to resume"
    command = ["scontrol", "requeue", job_id]
    restart = int(env.get("SLURM_RESTART_COUNT", 0)) + 1
    # Said before: Slurm ends the job as soon as the requeue is accepted.
    log.warning("requeueing Slurm job %s (restart %d): the job ends now and resumes from this checkpoint when it "
                "starts again", job_id, restart)
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"'{' '.join(command)}' failed ({err}); resubmit the job to resume"
    if result.returncode != 0:
        return (f"'{' '.join(command)}' failed with exit code {result.returncode}: "
                f"{(result.stderr or result.stdout).strip()}; resubmit the job to resume")
    return f"requeued Slurm job {job_id} (restart {restart})"


# The guard of this process: signal handlers are process-wide, so there is at most one. Entry points install it
# as early as they can (a requeue signal before any handler would kill the process); the loop takes it over.
_guard: Optional[PreemptionGuard] = None


def install(requeue_signal: str = "SIGUSR1", stop_signal: str = "SIGTERM") -> PreemptionGuard:
    """This process's guard for these signals, installed once (signals received so far are kept)."""
    global _guard
    if _guard is not None and (_guard.requeue_signal, _guard.stop_signal) != (parse_signal(requeue_signal),
                                                                              parse_signal(stop_signal)):
        uninstall()
    if _guard is None:
        _guard = PreemptionGuard(requeue_signal, stop_signal).install()
    return _guard


def uninstall() -> None:
    """Restore the handlers that were there before ``install`` and forget what was received."""
    global _guard
    if _guard is not None:
        _guard.uninstall()
        _guard = None


def shield_worker(worker_id: int) -> None:
    """``worker_init_fn`` of the DataLoaders used while training: the worker ignores the guard's signals.

    Slurm signals every process of a job step, loader workers included, and torch's worker handler dies of a
    SIGTERM that its parent did not send -- which the parent then reports as a crash before it can checkpoint.
    The worker needs no signal: it exits when its parent shuts it down, or dies. It was forked with the signals
    blocked (``workers_starting``); once they are ignored, a signal that arrived meanwhile is discarded."""
    if _guard is not None:
        for sig in _guard.signals:
            signal.signal(sig, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _guard.signals)


def iterate(loader):
    """Start ``loader``'s iterator (forking its workers) so that the workers survive the guard's signals: each
    ignores them (``shield_worker`` becomes the loader's worker init function) and is forked with them blocked
    until it does (``workers_starting``). Every DataLoader used while training starts this way."""
    if loader.worker_init_fn not in (None, shield_worker):
        raise ValueError(f"the loader already has a worker_init_fn ({loader.worker_init_fn!r})")
    loader.worker_init_fn = shield_worker
    with workers_starting():
        return iter(loader)


@contextlib.contextmanager
def workers_starting():
    """Around the start of a DataLoader iterator (which forks the workers): the guard's signals stay blocked,
    so that none reaches a worker between torch installing its own SIGTERM handler and ``shield_worker``;
    this process gets whatever arrived in the meantime when the block ends."""
    signals = _guard.signals if _guard is not None else []
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals) if signals else None
    try:
        yield
    finally:
        if previous is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
