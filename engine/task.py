"""What a training task is: the base class every task subclasses, overriding only what it needs.

A task owns its model, its training dataset and how a batch of it is made and scored; ``engine.loop.train`` owns
everything else (DeepSpeed, schedules, accumulation, checkpoints and exact resume, metrics, preemption, unreadable
videos) and ``engine.launch.launch`` turns a command line into a task and a training run. The defaults fit video
classification-like tasks whose items are clips (``datasets.video_dataset``); a task whose batches are something
else (boxes per clip, two clips per video, frozen features) overrides ``collate``, ``clips_in`` and ``blank_batch``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch
from torch.utils.data import Dataset

from datasets.video_dataset import collate_clips
from engine import checkpoint, ds
from engine.config import Derived
from engine.dist import is_main_process
from engine.optim import build_optimizer

log = logging.getLogger("train")


class Task:
    """Subclasses set ``config_class`` and, in ``__init__``, ``self.model`` and ``self.train_set``."""

    # the root config dataclass of the entry point: its sections include batch, optim, ds and run
    config_class: ClassVar[type]
    # what a finished run leaves in its output folder, for the last log line
    outputs: ClassVar[str] = "config.yaml, derived.yaml, metrics.jsonl, tb/, checkpoints/, weights.pt"

    model: torch.nn.Module  # the bare model; the loop wraps it in a DeepSpeed engine
    train_set: Dataset  # items for ``collate``; has set_epoch(epoch), and blank_item() for the default blank_batch

    def __init__(self, cfg: Any):
        self.cfg = cfg
        # Set by the launcher before training, from the config, the world size and len(train_set); the loop reads
        # it, and so do schedules the task runs itself (a mask ratio annealed over the run).
        self.derived: Optional[Derived] = None

    # ---- batches ---------------------------------------------------------------------------------------------

    def collate(self, items: list) -> dict:
        """One micro-batch from ``micro_batch`` dataset items. The dict keeps the items that could not be read
        under ``failures`` (``datasets.video_dataset.Failure``): the loop records them."""
        return collate_clips(items)

    def clips_in(self, batch: dict) -> int:
        """Clips the model sees in ``batch`` (throughput, MFU); 0 means nothing of it could be read."""
        return 0 if batch["video"] is None else batch["video"].shape[0]

    def blank_batch(self, size: int) -> dict:
        """A batch shaped like a readable one, all zeros: what a rank trains on, with zero weight, when every item
        of its micro-batch failed, so that it still takes part in the step's collectives."""
        return self.collate([self.train_set.blank_item() for _ in range(size)])

    def token_grid(self) -> Optional[tuple[int, int, int]]:
        """The model's token grid, logged with the derived values; None when it has none."""
        return None

    # ---- optimization ----------------------------------------------------------------------------------------

    def build_optimizer(self) -> torch.optim.Optimizer:
        """Which parameters train and how: by default every parameter that requires a gradient, in the shared
        groups (no weight decay for biases, norms and ``no_weight_decay()``; ``optim.layer_decay``), with the
        optimizer ``optim.name``. A probe freezes its backbone (``requires_grad_(False)``) before this runs."""
        return build_optimizer(self.model, self.cfg.optim, self.cfg.optim.layer_decay)

    def loss(self, engine, batch: dict, generator: torch.Generator) -> torch.Tensor:
        """The scalar loss of one collated micro-batch, already on the device; ``generator`` draws its masks."""
        raise NotImplementedError(f"{type(self).__name__} must define loss()")

    def step_metrics(self) -> dict[str, float]:
        """Values of the last micro-batch to log beside its loss at a logging step (the parts of a loss made of
        several); called on every rank, recorded by rank 0."""
        return {}

    def train_flops_per_clip(self) -> Optional[float]:
        """Model FLOPs of one clip's forward + backward, for FLOP/s and MFU; None when unknown."""
        return None

    # ---- hooks -----------------------------------------------------------------------------------------------

    def after_step(self, engine, step: int) -> None:
        """After optimizer step ``step`` (counted from 1): EMA updates, per-step task schedules."""

    def on_epoch_end(self, engine, epoch: int, output_dir: str, generator: torch.Generator) -> Optional[dict]:
        """After an epoch, on every rank (pictures, validation); metrics to log at the current step, or None."""
        return None

    def state_dict(self) -> dict:
        """What a resumed run needs besides the engine's state (EMA weights, best score); equal on every rank."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned, before the first step of a resumed run."""

    def finish(self, engine, output_dir: str) -> None:
        """After the last step and its checkpoint, on every rank: export the weights (``weights.pt``)."""
        export_final_weights(engine, Path(output_dir))


def export_final_weights(engine, out: Path, name: str = "weights.pt") -> int:
    """Write the whole fp32 weights of the newest complete checkpoint to ``out/name`` (rank 0; a collective under
    ZeRO, so every rank calls it), with the model's persistent buffers (a probe's feature statistics, a tokenizer's
    codebook: tensors it needs besides its parameters); returns that checkpoint's step."""
    step = checkpoint.latest_complete(out)
    weights = ds.consolidated_fp32_state_dict(engine, str(checkpoint.checkpoint_root(out)), checkpoint.step_tag(step))
    if is_main_process():
        checkpoint.export_weights({**weights, **persistent_buffers(engine.module)}, out / name)
        log.info("exported %s (load with torch.load(weights_only=True))", out / name)
    return step


def persistent_buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The buffers ``module.state_dict()`` holds (running statistics, a codebook), not its parameters and not its
    non-persistent buffers: what ``export_final_weights`` adds to the parameters."""
    parameters = {name for name, _ in module.named_parameters()}
    return {name: value for name, value in module.state_dict().items() if name not in parameters}
