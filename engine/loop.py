"""THE training loop, shared by every task.

A task (``engine.task.Task``) supplies the model, its training dataset, how items become a micro-batch, which
parameters train with which optimizer and what one micro-batch costs (``Task.loss``); the loop owns everything
else: DeepSpeed, the lr/wd schedules by global step, gradient accumulation, the resumable sampler, checkpoints
with exact resume, metrics, the non-finite-loss stop, and micro-batches whose videos could not be read
(zero-weight blank steps, ``engine.unreadable``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader

from datasets.sampler import ResumableDistributedSampler
from engine import checkpoint, ds, preempt
from engine.config import require, save_config
from engine.dist import DistInfo, barrier
from engine.metrics import MetricsWriter, Throughput, peak_memory_gib, utilization
from engine.optim import Schedules, apply_schedules, describe_groups
from engine.task import Task
from engine.unreadable import UnreadableLog

log = logging.getLogger("train")


@dataclass
class RunConfig:
    """Bookkeeping for one run: where it writes, how often, how reproducibly."""

    # human-readable run name (used in logs)
    name: str = "default"
    # directory for config.yaml, derived.yaml, logs and checkpoints
    output_dir: str = "runs/default"
    # base random seed (each rank offsets it by its rank)
    seed: int = 0
    # log training metrics every this many optimizer steps
    log_every: int = 20
    # save a checkpoint every this many epochs (and always after the last one)
    save_every_epochs: int = 20
    # also save every this many optimizer steps, for mid-epoch resume; 0 = only at epoch ends
    save_every_steps: int = 0
    # write reconstruction pictures to vis/ every this many epochs (and after the last one); 0 = never
    vis_every_epochs: int = 20
    # compile the model with torch.compile (inductor) through DeepSpeed; first steps are slower
    compile: bool = False
    # float32 matrix products and convolutions on TF32 tensor cores (CUDA, Ampere or newer): fp32 runs go ~8x
    # faster at ~1e-3 relative precision; bf16/fp16 runs are unaffected
    tf32: bool = True
    # number of most recent periodic checkpoints to keep on disk
    keep_last: int = 2
    # on this signal: checkpoint after the current step, requeue the Slurm job, exit (sbatch --signal=USR1@180);
    # "" = not handled
    requeue_signal: str = "SIGUSR1"
    # on this signal: checkpoint after the current step and exit, no requeue (scancel, preemption, time limit)
    stop_signal: str = "SIGTERM"

    def __post_init__(self) -> None:
        require(self.seed >= 0, f"seed must be >= 0, got {self.seed}")
        require(self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}")
        require(
            self.save_every_epochs >= 1,
            f"save_every_epochs must be >= 1, got {self.save_every_epochs}",
        )
        require(self.save_every_steps >= 0, f"save_every_steps must be >= 0, got {self.save_every_steps}")
        require(self.vis_every_epochs >= 0, f"vis_every_epochs must be >= 0, got {self.vis_every_epochs}")
        # The newest checkpoint may be the one a dying job was writing: keep one more.
        require(self.keep_last >= 2, f"keep_last must be >= 2, got {self.keep_last}")
        from engine.preempt import PreemptionGuard

        PreemptionGuard(self.requeue_signal, self.stop_signal)  # names checked at load time, not at the signal


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch
    consumed: int = 0  # this rank's sampler indices used in the current epoch
    unreadable: int = 0  # videos that failed to decode so far, summed over ranks (a video counts once per epoch)


class TrainingStopped(RuntimeError):
    """The run stopped before its last step; entry points log the message and exit with ``exit_code``."""

    exit_code = 1
    log_level = logging.ERROR


class NonFiniteLoss(TrainingStopped):
    pass


class Preempted(TrainingStopped):
    """Stopped on a requeue / stop signal after a complete checkpoint (see engine.preempt)."""

    exit_code = preempt.PREEMPTED_EXIT_CODE
    log_level = logging.WARNING


class ProgressLine:
    """A one-line progress bar on an interactive terminal (rank 0): steps, rate and time left. Host-sync free."""

    def __init__(self, start_step: int, total_steps: int):
        self.start_step, self.total = start_step, total_steps
        self.start = time.perf_counter()

    def update(self, step: int) -> None:
        done = (step - self.start_step) / max(self.total - self.start_step, 1)
        elapsed = time.perf_counter() - self.start
        rate = (step - self.start_step) / max(elapsed, 1e-9)
        left = (self.total - step) / max(rate, 1e-9)
        bar = "#" * int(30 * done)
        sys.stderr.write(f"\r[{bar:<30s}] step {step}/{self.total}  {rate:.2f} steps/s  {left / 60:.1f} min left")
        sys.stderr.flush()

    def close(self) -> None:
        sys.stderr.write("\n")


def _seed_streams(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _to_device(batch: Any, device: torch.device) -> Any:
    """Every tensor of a batch on the device, through nested dicts, lists and tuples (boxes per clip...)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {key: _to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(value, device) for value in batch)
    return batch


def train(task: Task, info: DistInfo) -> TrainState:
    """Run (or resume, or report complete) the training of ``task``: its config ``task.cfg`` (a root config with
    ``batch``, ``optim``, ``run`` and ``ds`` sections) and the values derived from it, ``task.derived``."""
    cfg, derived = task.cfg, task.derived
    if info.is_main:
        save_config(cfg, cfg.run.output_dir, derived)
    run = _Training(task, info)
    state = run.resume()
    if state.step >= derived.total_steps:
        log.info("the run in %s is complete (%d steps)", run.out, state.step)
        if _finished_step(run.out) != state.step:  # a run killed after its last checkpoint, before its exports
            _finish(task, run.engine, run.out, state.step, info)
        return state
    log.info("training from step %d to %d (%d per epoch, epoch %d)", state.step, derived.total_steps,
             derived.steps_per_epoch, state.epoch)
    with run.policies(state):
        while state.step < derived.total_steps:
            run.train_epoch(state)
            run.end_epoch(state)
    _finish(task, run.engine, run.out, state.step, info)
    return state


def _build_engine(task: Task):
    """The DeepSpeed engine of the task's model and optimizer, under the config's ZeRO stage and precision."""
    cfg = task.cfg
    ds_config = ds.build_ds_config(cfg.ds, cfg.batch, task.derived, cfg.optim.clip_grad)
    optimizer = task.build_optimizer()
    log.info("parameter groups:\n%s", describe_groups(optimizer.param_groups))
    if ds.offloads_optimizer(ds_config):
        optimizer = ds.cpu_adam_like(optimizer)
    engine = ds.initialize(task.model, optimizer, ds_config)
    if cfg.run.compile:
        engine.compile()  # parameter names stay those of the bare module: checkpoints are unaffected
    return engine


class _Training:
    """One run's moving parts, built once (the engine, its schedules and random streams, the sampler), and what
    acts after a micro-step, a step and an epoch. Each policy decides for itself when it acts: logging every
    ``run.log_every`` steps, saving (``_save_step``, ``end_epoch``), the stop signals, and the ledger of unreadable
    videos, gathered whenever a record or a checkpoint is about to be written."""

    def __init__(self, task: Task, info: DistInfo):
        self.task, self.info, self.cfg, self.derived = task, info, task.cfg, task.derived
        self.out = self.cfg.run.output_dir
        self.engine = _build_engine(task)
        self.schedules = Schedules.from_config(self.cfg.optim, self.derived)
        seed = self.cfg.run.seed * 1000 + info.rank
        _seed_streams(seed)  # drop path etc.: a stream of its own on every rank
        self.generator = torch.Generator(device=self.engine.device).manual_seed(seed)  # masks
        self.sampler = ResumableDistributedSampler(len(task.train_set), info.world_size, info.rank,
                                                   seed=self.cfg.run.seed)
        self.micro_per_epoch = self.derived.steps_per_epoch * self.cfg.batch.grad_accum
        self.loss = None  # the last micro-batch's; None when a resume at an epoch's very end trains none before it
        self.shown = None  # the loss of this step's last micro-batch that had clips: what the metrics record shows
        self.save_at_epoch_end = False  # a periodic save of an epoch's last step, made once by the epoch's end

    def resume(self) -> TrainState:
        return _resume(self.engine, self.out, self.sampler, self.generator, self.task)

    @contextlib.contextmanager
    def policies(self, state: TrainState):
        """The signal handlers, the metrics files, the unreadable-video ledger and the progress line, for the
        time of the training."""
        info = self.info
        self.guard = preempt.install(self.cfg.run.requeue_signal, self.cfg.run.stop_signal)
        self.metrics = MetricsWriter(self.out, enabled=info.is_main)
        self.throughput = Throughput()
        self.unreadable = UnreadableLog(self.out, info.is_main)
        self.flops = self.task.train_flops_per_clip()
        tty = info.is_main and sys.stderr.isatty()
        self.progress = ProgressLine(state.step, self.derived.total_steps) if tty else None
        try:
            yield
        finally:
            preempt.uninstall()
            self.metrics.close()
            if self.progress:
                self.progress.close()

    def train_epoch(self, state: TrainState) -> None:
        """The micro-steps left in ``state.epoch``, from ``state.consumed`` on."""
        cfg, task = self.cfg, self.task
        self.sampler.set_epoch(state.epoch)
        task.train_set.set_epoch(state.epoch)
        loader = DataLoader(task.train_set, batch_size=cfg.batch.micro_batch, sampler=self.sampler,
                            collate_fn=task.collate, num_workers=cfg.batch.num_workers,
                            pin_memory=self.engine.device.type == "cuda", persistent_workers=False,
                            generator=_loader_seed_source(cfg, state))
        micro = state.consumed // cfg.batch.micro_batch
        waited = time.perf_counter()
        for batch in preempt.iterate(loader):
            if micro >= self.micro_per_epoch or state.step >= self.derived.total_steps:
                break
            boundary = self._micro_step(state, batch, time.perf_counter() - waited)
            micro += 1
            if boundary:
                self._after_step(state, ends_epoch=micro >= self.micro_per_epoch)
            waited = time.perf_counter()

    def _micro_step(self, state: TrainState, batch: dict, data_wait: float) -> bool:
        """Forward, backward and (on an accumulation boundary, whose being one it returns) the optimizer step."""
        micro_batch = self.cfg.batch.micro_batch
        self.unreadable.add(batch.get("failures", ()), state.step + 1, state.epoch)
        self.lr, self.wd = apply_schedules(self.engine.optimizer, state.step, self.schedules)
        self.loss, clips = _micro_batch_loss(self.task, self.engine, batch, micro_batch, self.generator)
        if clips:
            self.shown = self.loss
        boundary = ds.engine_step(self.engine, self.loss)
        state.consumed += micro_batch
        self.throughput.add(clips, data_wait)
        return boundary

    def _after_step(self, state: TrainState, ends_epoch: bool) -> None:
        """After optimizer step ``state.step``: the task's hook, the log record, the checkpoint and the stop
        signals, each when due. The same decisions on every rank (``poll`` and the ledger are collectives)."""
        run, total = self.cfg.run, self.derived.total_steps
        state.step += 1
        self.task.after_step(self.engine, state.step)
        if self.progress:
            self.progress.update(state.step)
        request = self.guard.poll() if state.step < total else None  # the last step finishes normally
        periodic = bool(run.save_every_steps) and state.step % run.save_every_steps == 0
        # An epoch's last step is saved by the epoch's end, with the epoch's results: one save per step.
        save_now = request is not None or (periodic and not ends_epoch)
        if periodic and not save_now:
            self.save_at_epoch_end = True
            _check_finite(self.engine, self.loss.item(), state.step)  # before the epoch's end acts on the weights
        logging_step = state.step % run.log_every == 0 or state.step == total
        if logging_step or save_now:  # (a deferred save gathers at the epoch's end)
            state.unreadable += self.unreadable.gather()
        if logging_step:
            _log_step(self.metrics, self.engine, state, self.loss, self.shown, self.lr, self.wd, self.throughput,
                      self.flops, self.task)
        self.shown = None
        if save_now:
            self._save_step(state)
        if request is not None:
            raise preempted(request, f"step {state.step}", self.info.is_main)

    def end_epoch(self, state: TrainState) -> None:
        """The task's end of an epoch (validation, pictures), its metrics, and the epoch's checkpoint when due."""
        state.epoch += 1
        state.consumed = 0
        epoch_metrics = self.task.on_epoch_end(self.engine, state.epoch, self.out, self.generator)
        if epoch_metrics:
            self.metrics.write(state.step, {"epoch": state.epoch, **epoch_metrics}, prefix="eval")
        last = state.step >= self.derived.total_steps
        if last or state.epoch % self.cfg.run.save_every_epochs == 0 or self.save_at_epoch_end:
            state.unreadable += self.unreadable.gather()
            self._save_step(state)

    def _save_step(self, state: TrainState) -> None:
        """The one way a checkpoint is written: never of a diverged model."""
        if self.loss is not None:
            _check_finite(self.engine, self.loss.item(), state.step)
        _save(self.engine, self.out, state, self.sampler, self.generator, self.task, self.cfg.run.keep_last)
        self.save_at_epoch_end = False


def _loader_seed_source(cfg, state: TrainState) -> torch.Generator:
    """What the DataLoader draws its workers' base seed from when an epoch's iterator starts. Without it the draw
    comes from the global torch RNG -- which drop path also uses -- and a run resumed mid-epoch, which starts an
    extra iterator, would continue on a shifted stream. (Clips do not depend on it: they are seeded by
    (seed, epoch, index).)"""
    return torch.Generator().manual_seed(cfg.run.seed * 100003 + state.epoch)


def _micro_batch_loss(task: Task, engine, batch: dict, micro_batch: int, generator) -> tuple[torch.Tensor, int]:
    """(loss, clips trained on) of one micro-batch. When every video of it failed to decode, this rank still runs
    the step on blank clips with zero weight: DeepSpeed's gradient reductions, ZeRO-3's parameter gathers and its
    accumulation count stay matched on every rank (a rank that raised or skipped would hang the others), and the
    run goes on. The blank micro-batch is as large as a decoded one (same shapes: a compiled model does not
    recompile; the other ranks take as long) and, being finite, makes the gradient exactly zero. The step then
    averages the other ranks' gradients with that zero; where every rank's micro-batch failed, AdamW still steps
    on its moments and weight decay, as after any zero gradient."""
    clips = task.clips_in(batch)
    if clips:
        return task.loss(engine, _to_device(batch, engine.device), generator), clips
    blank = task.blank_batch(micro_batch)
    return task.loss(engine, _to_device(blank, engine.device), generator) * 0.0, 0


def preempted(request: preempt.StopRequest, where: str, is_main: bool) -> Preempted:
    """After the checkpoint of ``where`` (a step, a feature shard): every rank says so, then rank 0 requeues the Slurm
    job if asked to. A successful requeue ends the job at once (what is logged after it may be lost), hence the log
    lines first; the ranks wait for rank 0 before exiting, so that no rank's exit (srun --kill-on-bad-exit) kills it
    first."""
    log.warning("stopping on %s after %s, whose checkpoint is complete", request.signal_name, where)
    barrier()
    if request.requeue and is_main:
        outcome = preempt.requeue_slurm_job()
    elif request.requeue:
        outcome = "rank 0 requeues the job"
    else:
        outcome = "not requeued; run the same command again to resume"
    barrier()
    return Preempted(f"stopped on {request.signal_name} after {where}: {outcome}")


def _finished_marker(out) -> Path:
    return Path(out) / "finished.json"


def _finished_step(out) -> Optional[int]:
    """The step whose exports (``Task.finish``) completed, or None."""
    marker = _finished_marker(out)
    return json.loads(marker.read_text())["step"] if marker.exists() else None


def _finish(task: Task, engine, out, step: int, info: DistInfo) -> None:
    task.finish(engine, out)
    if info.is_main:
        _finished_marker(out).write_text(json.dumps({"step": step}) + "\n")


def _check_finite(engine, value: float, step: int) -> None:
    if not math.isfinite(value) and ds.loss_scale(engine) is None:
        # fp16 overflow is the loss scaler's business; anything else is a broken run. The last complete
        # checkpoint stays as it is: nothing is saved after this point.
        raise NonFiniteLoss(f"non-finite loss {value} at step {step}; the last complete checkpoint "
                            "is kept, resume from it after fixing the cause")


def _log_step(metrics, engine, state, loss, shown, lr, wd, throughput, flops, task: Task) -> None:
    """``loss``: the last micro-batch's, checked; ``shown``: the last one with clips in this step, recorded. A step
    in which this rank decoded nothing has no loss to show: its record leaves "loss" out rather than log the 0 of
    a zero-weighted blank micro-batch as if the model were perfect."""
    value = loss.item()  # the one host sync of a logging step (two when the last micro-batch was blank)
    _check_finite(engine, value, state.step)
    record = {"epoch": state.epoch}
    if shown is not None:
        record["loss"] = value if shown is loss else shown.item()
        _check_finite(engine, record["loss"], state.step)
        record.update(task.step_metrics())
    rates = throughput.read()
    record.update({"lr": lr, "wd": wd, "grad_norm": ds.global_grad_norm(engine), **rates,
                   **(utilization(flops, rates["clips_per_s"], ds.peak_flops()) if flops else {}), "peak_mem_gib": peak_memory_gib(),
                   "unreadable_videos": state.unreadable})
    scale = ds.loss_scale(engine)
    if scale is not None:
        record.update(loss_scale=scale, skipped_steps=ds.skipped_steps(engine))
    metrics.write(state.step, record)


def _save(engine, out, state: TrainState, sampler, generator, task: Task, keep_last: int) -> None:
    client = {"train_state": asdict(state), "sampler": sampler.state_dict(state.consumed),
              "task": task.state_dict()}
    rank_state = {"rng": checkpoint.rng_states(), "generator": generator.get_state()}
    path = checkpoint.save_checkpoint(engine, out, state.step, client, keep_last, rank_state=rank_state)
    log.info("saved %s", path)


def _resume(engine, out, sampler, generator, task: Task) -> TrainState:
    loaded = checkpoint.load_latest(engine, out)
    if loaded is None:
        return TrainState()
    client, rank_state = loaded
    state = TrainState(**client["train_state"])
    sampler.load_state_dict(client["sampler"])
    task.load_state_dict(client.get("task", {}))
    if rank_state is not None:
        checkpoint.restore_rng_states(rank_state["rng"])
        generator.set_state(rank_state["generator"])
    log.info("resumed from step %d (epoch %d, %d samples into it)", state.step, state.epoch, state.consumed)
    return state
