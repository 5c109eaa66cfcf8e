"""A grid of linear heads trained in one pass against one head alone, on the same cached features.

    python run_scripts/bench_probe_grid.py [--dim 768] [--classes 400] [--batch 1024] [--heads 32] [--steps 20]

What a linear probe run does per step, on one rank: a batch of cached features read from float16 shards
(``engine.eval.features.FeatureSplit``, memory-mapped, one read per batch), the ``LinearHeadGrid`` forward, the sum of
the heads' losses, backward and the SGD step of DeepSpeed's engine over the heads' parameter groups. The grid is
pools x lrs x weight decays (3 x N/6 x 2 when N divides so, else 1 x N x 1). Rounds alternate one head and the
grid, so a busy machine slows both alike; the median step time of each is reported with the ratio, the target
being N = 32 heads within 2x one head, and the ratio to training the N heads one at a time (N x one head).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file, installed or not

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, RandomSampler  # noqa: E402

from engine import ds  # noqa: E402
from engine.eval.features import FeatureSplit, shard_path  # noqa: E402
from engine.optim import OptimConfig, optimizer_over  # noqa: E402
from engine.tasks.probe import CachedTrainViews, collate_features, head_param_groups  # noqa: E402
from models.probe import DEFAULT_POOLS as POOLS, LinearHeadGrid, head_grid, per_head_loss  # noqa: E402
from run_scripts.bench_gpu import alternating_medians  # noqa: E402


def write_cache(directory: Path, rows: int, dim: int, classes: int, shard_rows: int = 4096) -> FeatureSplit:
    """Random float16 features in the cache's layout, one row per training video, as extraction writes them."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, classes, rows)
    shards = 0
    for shards, start in enumerate(range(0, rows, shard_rows), start=1):
        n = min(shard_rows, rows - start)
        np.save(shard_path(directory, shards - 1, ".npy"), rng.normal(size=(n, len(POOLS), dim)).astype(np.float16))
        meta = {"video": list(range(start, start + n)), "view": [0] * n, "crop": [0] * n,
                "label": labels[start:start + n].tolist(), "valid": [True] * n, "failures": []}
        shard_path(directory, shards - 1, ".json").write_text(json.dumps(meta))
    records = [type("Record", (), {"label": int(label)})() for label in labels]
    return FeatureSplit(directory, shards, records, 1)


def grid_of(heads: int):
    if heads % (len(POOLS) * 2) == 0:
        return head_grid(POOLS, [0.01 * (i + 1) for i in range(heads // (len(POOLS) * 2))], [0.0, 1e-4])
    return head_grid(POOLS[:1], [0.01 * (i + 1) for i in range(heads)], [0.0])


class Trainer:
    """One DeepSpeed engine over a grid, and an endless loader of the cached training features."""

    def __init__(self, split: FeatureSplit, heads: int, classes: int, batch: int):
        specs = grid_of(heads)
        model = LinearHeadGrid(split.dim, classes, POOLS, specs)
        optim = OptimConfig(name="sgd", blr=0.1, weight_decay=0.0, min_lr=0.0, warmup_lr=0.0)
        config = ds.load_template("zero0_fp32")
        config.update(train_micro_batch_size_per_gpu=batch, gradient_accumulation_steps=1, train_batch_size=batch)
        self.engine = ds.initialize(model, optimizer_over(head_param_groups(model, specs, optim.blr), optim), config)
        dataset = CachedTrainViews(split, 1)
        loader = DataLoader(dataset, batch_size=batch, sampler=RandomSampler(dataset, generator=torch.Generator()),
                            collate_fn=collate_features, num_workers=0, drop_last=True)
        self.batches = self._forever(loader)

    @staticmethod
    def _forever(loader):
        while True:
            yield from loader

    def step(self) -> None:
        batch = next(self.batches)
        device = self.engine.device
        loss = per_head_loss(self.engine(batch["features"].to(device)), batch["label"].to(device))
        self.engine.backward(loss)
        self.engine.step()
        loss.item()  # the step is done when its loss is known (a GPU would still be running it otherwise)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=768, help="feature width (ViT-B: 768)")
    parser.add_argument("--classes", type=int, default=400, help="classes (K400: 400, SSv2: 174)")
    parser.add_argument("--batch", type=int, default=1024, help="features per step (VideoMAE Table 11: 1024)")
    parser.add_argument("--heads", type=int, default=32, help="heads of the grid")
    parser.add_argument("--rows", type=int, default=16384, help="cached training features")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, alternating one head and the grid")
    parser.add_argument("--json", help="also write the figures to this file")
    return parser.parse_args(argv)


def measure(dim: int, classes: int, batch: int, heads: int, rows: int, steps: int, rounds: int) -> dict:
    """Median step time of one head and of ``heads`` in one pass on the same cache, and their ratios."""
    with tempfile.TemporaryDirectory() as tmp:
        split = write_cache(Path(tmp) / "train", rows, dim, classes)
        trainers = {"one": Trainer(split, 1, classes, batch), "grid": Trainer(split, heads, classes, batch)}
        medians = alternating_medians({name: trainer.step for name, trainer in trainers.items()}, steps, rounds,
                                      warmup=3)
    one, grid = medians["one"], medians["grid"]
    return {"dim": dim, "classes": classes, "batch": batch, "heads": heads,
            "device": "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)",
            "one_head_ms": round(1000 * one, 2), "grid_ms": round(1000 * grid, 2),
            "grid_over_one": round(grid / one, 2),
            "one_at_a_time_over_grid": round(heads * one / grid, 2), "target": TARGET}


# the grid of 32 heads within this many times one head's step
TARGET = 2.0


def describe(figures: dict) -> str:
    return (f"{figures['heads']} heads in one pass: {figures['grid_ms']} ms/step; one head: {figures['one_head_ms']} "
            f"ms/step; ratio {figures['grid_over_one']}x (target <= {TARGET:g}x); {figures['heads']} heads one at a "
            f"time would take {figures['one_at_a_time_over_grid']}x the grid's time  [{figures['device']}, "
            f"D={figures['dim']}, C={figures['classes']}, batch {figures['batch']}]")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    figures = measure(args.dim, args.classes, args.batch, args.heads, args.rows, args.steps, args.rounds)
    print(describe(figures))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
