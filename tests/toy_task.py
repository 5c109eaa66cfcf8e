"""A task whose batches are not video classification, run through the shared launcher and loop: each item is a small
clip with a variable number of boxes (0 to 3) and a multi-hot label per box, the shape of an action-detection batch.
Item 5 can never be read, as a corrupt video would be. Run as an entry point by tests/test_platform.py:

    python tests/toy_task.py --config RECIPE run.output_dir=... [key=value ...]
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets.video_dataset import Failure  # noqa: E402
from engine.config import BatchConfig  # noqa: E402
from engine.ds import DeepSpeedConfig  # noqa: E402
from engine.launch import launch  # noqa: E402
from engine.loop import RunConfig  # noqa: E402
from engine.optim import OptimConfig  # noqa: E402
from engine.task import Task  # noqa: E402

UNREADABLE = 5  # the index of the item that always fails


@dataclass
class ToyDataConfig:
    # items in the training set
    num_items: int = 24
    # action classes a box can carry (multi-hot)
    num_classes: int = 3
    # the process kills itself with SIGKILL right after this optimizer step (a crash at a known point); 0 = never
    die_after_step: int = 0


@dataclass
class ToyConfig:
    data: ToyDataConfig = field(default_factory=ToyDataConfig)  # the generated boxes
    batch: BatchConfig = field(default_factory=lambda: BatchConfig(micro_batch=4, num_workers=0))  # items per step
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(epochs=3, warmup_epochs=1, blr=1e-2))  # optimizer
    ds: DeepSpeedConfig = field(default_factory=lambda: DeepSpeedConfig(template="zero1_fp32"))  # DeepSpeed template
    run: RunConfig = field(default_factory=RunConfig)  # output folder, seed, checkpoints


class BoxesDataset(Dataset):
    """Item i: a (3, 4, 8, 8) uint8 clip and i % 4 boxes (x1, y1, x2, y2 in [0, 1]) with multi-hot labels; the
    content depends on (epoch, index) only, so a resumed run sees the same items."""

    def __init__(self, cfg: ToyDataConfig):
        self.cfg = cfg
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.cfg.num_items

    def __getitem__(self, index: int):
        if index == UNREADABLE:
            return Failure(index, f"item_{index}.mp4", "VideoReadError: truncated file")
        generator = torch.Generator().manual_seed(1000 * self.epoch + index)
        num_boxes = index % 4
        corners = torch.rand(num_boxes, 2, 2, generator=generator).sort(dim=1).values.reshape(num_boxes, 4)
        labels = (torch.rand(num_boxes, self.cfg.num_classes, generator=generator) < 0.4).float()
        clip = torch.randint(0, 256, (3, 4, 8, 8), generator=generator, dtype=torch.uint8)
        return {"clip": clip, "boxes": corners, "labels": labels}


class BoxScorer(nn.Module):
    """Pools the clip, joins each box's coordinates, and scores every class per box."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.clip = nn.Linear(3, 16)
        self.box = nn.Linear(4, 16)
        self.head = nn.Linear(16, num_classes)

    def forward(self, clips: torch.Tensor, boxes: list[torch.Tensor]) -> torch.Tensor:
        pooled = self.clip(clips.float().mean(dim=(2, 3, 4)) / 255)
        per_box = [torch.relu(pooled[i] + self.box(b)) for i, b in enumerate(boxes)]
        return self.head(torch.cat(per_box))


class BoxesTask(Task):
    config_class = ToyConfig
    outputs = "config.yaml, derived.yaml, metrics.jsonl, checkpoints/, weights.pt"

    def __init__(self, cfg: ToyConfig):
        super().__init__(cfg)
        torch.manual_seed(cfg.run.seed)
        self.model = BoxScorer(cfg.data.num_classes)
        self.train_set = BoxesDataset(cfg.data)

    def collate(self, items: list) -> dict:
        good = [item for item in items if not isinstance(item, Failure)]
        return {"clips": torch.stack([item["clip"] for item in good]) if good else None,
                "boxes": [item["boxes"] for item in good], "labels": [item["labels"] for item in good],
                "failures": [item for item in items if isinstance(item, Failure)]}

    def clips_in(self, batch: dict) -> int:
        return len(batch["boxes"])

    def blank_batch(self, size: int) -> dict:
        return {"clips": torch.zeros(size, 3, 4, 8, 8, dtype=torch.uint8), "boxes": [torch.zeros(1, 4)] * size,
                "labels": [torch.zeros(1, self.cfg.data.num_classes)] * size, "failures": []}

    def after_step(self, engine, step: int) -> None:
        if step == self.cfg.data.die_after_step:
            os.kill(os.getpid(), signal.SIGKILL)

    def loss(self, engine, batch: dict, generator: torch.Generator) -> torch.Tensor:
        logits = engine(batch["clips"], batch["boxes"])
        targets = torch.cat(batch["labels"])
        if targets.numel() == 0:  # a micro-batch whose clips hold no box still takes part in the step
            return logits.sum() * 0.0
        return nn.functional.binary_cross_entropy_with_logits(logits, targets)


TASK = BoxesTask


def main(argv=None) -> int:
    return launch(TASK, argv, doc=__doc__)


if __name__ == "__main__":
    sys.exit(main())
