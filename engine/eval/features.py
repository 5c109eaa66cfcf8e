"""Features of a frozen encoder, extracted once into the run directory and read back memory-mapped.

One folder per split (``<run>/features/<split>/``)::

    spec.json              what the features were extracted with; features of another spec are refused
    shard_00000.npy        float16 (rows, pools, D): one row per clip, ``shard_items`` items x clips per item
    shard_00000.json       each row's video, view, crop, label and whether it was read; the unreadable videos;
                           written after the .npy, so its presence marks a complete shard

Shards are split over the ranks (shard k on rank k mod world size) and each is computed from the same items in
the same batches whatever the number of ranks, so one rank and two give the same bytes. A run killed during the
extraction keeps its complete shards and computes only the missing ones when it starts again; a requeue or stop
signal is acted on between shards (every rank finishes its shard of the round first).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from datasets.files import atomic_path, write_text_atomic
from datasets.video_dataset import Failure
from engine import preempt
from engine.config import ConfigError, require
from engine.dist import barrier, get_rank, get_world_size, is_main_process
from models.probe import DEFAULT_POOLS, POOLS

log = logging.getLogger("features")


@dataclass
class FeatureConfig:
    # augmented views cached per training video (data.train_augment; epoch e of the probe trains on view e mod this)
    train_views: int = 1
    # pooled features cached per clip: mean (last block, no norm), norm_mean (after the final norm), last_k_mean, and
    # for an encoder with a cls token cls ([CLS] after the final norm: VIMPAC's feature)
    pools: list[str] = field(default_factory=lambda: list(DEFAULT_POOLS))
    # blocks averaged by last_k_mean
    last_k: int = 4
    # dataset items per shard file: what a killed extraction recomputes at most, per rank
    shard_items: int = 256
    # clips per forward of the encoder
    micro_batch: int = 16
    # DataLoader workers decoding the videos, per rank
    num_workers: int = 8
    # the encoder's precision: auto = bf16 on a GPU, fp32 on the CPU (features are stored as fp16 either way)
    precision: Literal["auto", "fp32", "bf16"] = "auto"

    def __post_init__(self) -> None:
        require(self.train_views >= 1, f"train_views must be >= 1, got {self.train_views}")
        unknown = [p for p in self.pools if p not in POOLS]
        require(bool(self.pools) and not unknown, f"pools must be a non-empty list of {', '.join(POOLS)}, got "
                f"{self.pools}")
        require(len(set(self.pools)) == len(self.pools), f"pools are listed twice: {self.pools}")
        require(self.last_k >= 1, f"last_k must be >= 1, got {self.last_k}")
        require(self.shard_items >= 1 and self.micro_batch >= 1,
                f"shard_items and micro_batch must be >= 1, got {self.shard_items}, {self.micro_batch}")
        require(self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}")

    def dtype(self, device: torch.device) -> torch.dtype:
        if self.precision == "bf16" or (self.precision == "auto" and device.type == "cuda"):
            return torch.bfloat16
        return torch.float32


def shard_path(directory: Path, k: int, suffix: str) -> Path:
    return directory / f"shard_{k:05d}{suffix}"


def shard_complete(directory: Path, k: int) -> bool:
    return shard_path(directory, k, ".json").is_file() and shard_path(directory, k, ".npy").is_file()


class _Positioned(Dataset):
    """``dataset``'s item i as (i, item): the position tells the row an item's clips go to, also for an item that
    could not be read."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return i, self.dataset[i]


def _keep_positions(batch: list):
    return batch


def _shard_batches(shards: list[int], size: int, cfg: FeatureConfig, per_item: int) -> list[list[int]]:
    """The item batches of ``shards``, in order, none spanning two shards: a shard is computed in the same batches
    whichever rank computes it (batch composition can change a kernel's rounding)."""
    step = max(1, cfg.micro_batch // per_item)
    batches = []
    for k in shards:
        items = range(k * cfg.shard_items, min((k + 1) * cfg.shard_items, size))
        batches += [list(items[i:i + step]) for i in range(0, len(items), step)]
    return batches


def _check_spec(directory: Path, spec: dict) -> None:
    """Write ``spec.json`` (rank 0, first use), or refuse features extracted with another spec."""
    path = directory / "spec.json"
    if not is_main_process():
        barrier()
    if is_main_process():
        directory.mkdir(parents=True, exist_ok=True)
        if not path.is_file():
            write_text_atomic(path, json.dumps(spec, indent=2, sort_keys=True) + "\n")
    stored = json.loads(path.read_text())
    if is_main_process():
        barrier()
    if stored != spec:
        changed = sorted(k for k in set(stored) | set(spec) if stored.get(k) != spec.get(k))
        raise ConfigError(f"the features in {directory} were extracted with other settings ({', '.join(changed)} "
                          f"differ): delete {directory} to extract them again, or use another run.output_dir")


def extract_split(forward: Callable[[torch.Tensor], torch.Tensor], dim: int, dataset: Dataset, directory: Path,
                  spec: dict, cfg: FeatureConfig, *, to_input: Callable[[torch.Tensor], torch.Tensor],
                  device: torch.device, stop_signals: tuple[str, str] = ("SIGUSR1", "SIGTERM"),
                  on_shard: Optional[Callable[[int], None]] = None) -> "FeatureSplit":
    """Cache ``forward``'s features of every item of ``dataset`` in ``directory`` (every rank calls it; shards
    already complete are kept) and return them, memory-mapped.

    ``forward(input)`` → (clips, len(cfg.pools), ``dim``), run without gradients; ``to_input`` turns uint8 clips on the
    device into its input. ``dataset`` items hold ``clips_per_item`` clips; a ``Failure`` leaves its rows marked
    unread. ``on_shard(k)``: called after shard ``k`` is written (tests stop an extraction there)."""
    _check_spec(directory, spec)
    per_item = dataset.clips_per_item
    num_shards = math.ceil(len(dataset) / cfg.shard_items)
    world, rank = get_world_size(), get_rank()
    guard = preempt.install(*stop_signals)
    done = sum(shard_complete(directory, k) for k in range(num_shards))
    if done < num_shards:
        log.info("%s: extracting %d of %d shards (%d clips per item)", directory, num_shards - done, num_shards,
                 per_item)
    rounds = range(0, num_shards, world)
    mine = [first + rank for first in rounds if first + rank < num_shards]
    todo = [k for k in mine if not shard_complete(directory, k)]
    # One loader for all of this rank's shards: its workers start once, not once per shard.
    loader = DataLoader(_Positioned(dataset), batch_sampler=_shard_batches(todo, len(dataset), cfg, per_item),
                        collate_fn=_keep_positions, num_workers=cfg.num_workers, pin_memory=device.type == "cuda")
    batches = preempt.iterate(loader) if todo else iter(())
    for first in rounds:
        k = first + rank
        if k in todo:
            _write_shard(forward, dim, batches, directory, k, len(dataset), cfg, to_input, device, per_item)
            if on_shard is not None:
                on_shard(k)
        request = guard.poll()  # the same rounds on every rank: a collective
        if request is not None:
            from engine.loop import preempted

            raise preempted(request, f"feature shard {min(first + world, num_shards)} of {num_shards}",
                            is_main_process())
    barrier()
    return FeatureSplit(directory, num_shards, dataset.records, getattr(dataset, "views_per_video", per_item))


@torch.inference_mode()
def _write_shard(forward, dim: int, batches, directory: Path, k: int, size: int, cfg: FeatureConfig, to_input,
                 device: torch.device, per_item: int) -> None:
    """Take shard ``k``'s batches from ``batches`` (the loader of ``_shard_batches``), compute and write it."""
    start = time.perf_counter()
    first, stop = k * cfg.shard_items, min((k + 1) * cfg.shard_items, size)
    rows = (stop - first) * per_item
    features = np.zeros((rows, len(cfg.pools), dim), dtype=np.float16)
    meta = {"video": [-1] * rows, "view": [0] * rows, "crop": [0] * rows, "label": [-1] * rows,
            "valid": [False] * rows}
    failures: list[list] = []
    clips, seen = 0, 0
    while seen < stop - first:
        batch = [(i - first, item) for i, item in next(batches)]
        seen += len(batch)
        good = [(i, item) for i, item in batch if not isinstance(item, Failure)]
        for i, item in batch:
            if isinstance(item, Failure):
                failures.append([item.index, item.path, item.reason])
                for row in range(i * per_item, (i + 1) * per_item):
                    meta["video"][row] = item.index
        if not good:
            continue
        video = torch.cat([item["video"] for _, item in good]).to(device, non_blocking=True)
        out = forward(to_input(video)).float().cpu().numpy()
        offset = 0
        for i, item in good:
            for crop in range(per_item):
                row = i * per_item + crop
                features[row] = out[offset]
                meta["video"][row], meta["view"][row], meta["crop"][row] = item["index"], item["view"], crop
                meta["label"][row], meta["valid"][row] = item["label"], True
                offset += 1
        clips += len(out)
    with atomic_path(shard_path(directory, k, ".npy"), fsync=False) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, features)
    seconds = time.perf_counter() - start
    meta.update(failures=failures, seconds=round(seconds, 3))
    write_text_atomic(shard_path(directory, k, ".json"), json.dumps(meta) + "\n")
    log.info("%s: shard %d, %d clips in %.1f s (%.1f clips/s)%s", directory.name, k, clips, seconds,
             clips / max(seconds, 1e-9), f", {len(failures)} unreadable" if failures else "")


class FeatureSplit:
    """A cached split: features (rows, pools, D) float16, memory-mapped, and each row's video, view, crop, label
    and validity; ``records``: the split's videos, ``expected_views``: rows of a video when all are read."""

    def __init__(self, directory: Path, num_shards: int, records: list, expected_views: int):
        self.directory = directory
        self.records, self.expected_views = records, expected_views
        self.shards = [np.load(shard_path(directory, k, ".npy"), mmap_mode="r") for k in range(num_shards)]
        metas = [json.loads(shard_path(directory, k, ".json").read_text()) for k in range(num_shards)]
        self.video = np.concatenate([np.asarray(m["video"], dtype=np.int64) for m in metas])
        self.view = np.concatenate([np.asarray(m["view"], dtype=np.int64) for m in metas])
        self.crop = np.concatenate([np.asarray(m["crop"], dtype=np.int64) for m in metas])
        self.label = np.concatenate([np.asarray(m["label"], dtype=np.int64) for m in metas])
        self.valid = np.concatenate([np.asarray(m["valid"], dtype=bool) for m in metas])
        self.failures = sorted({(f[0], f[1], f[2]) for m in metas for f in m["failures"]})
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def dim(self) -> int:
        return self.shards[0].shape[-1]

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """Features of the given rows (n, pools, D), float32, in the given order."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), *self.shards[0].shape[1:]), dtype=np.float32)
        shard = np.searchsorted(self.starts, rows, side="right") - 1
        for k in np.unique(shard):
            where = shard == k
            out[where] = self.shards[k][rows[where] - self.starts[k]]
        return out

    def chunks(self, size: int = 4096):
        """(row indices, features float32) of every valid row, in row order, ``size`` rows at a time."""
        valid = np.flatnonzero(self.valid)
        for start in range(0, len(valid), size):
            rows = valid[start:start + size]
            yield rows, self.rows(rows)

    def standardization(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance (pools, D) of the valid rows, accumulated in float64."""
        total = np.zeros(self.shards[0].shape[1:], dtype=np.float64)
        squares = np.zeros_like(total)
        count = 0
        for _, chunk in self.chunks():
            chunk = chunk.astype(np.float64)
            total += chunk.sum(axis=0)
            squares += (chunk**2).sum(axis=0)
            count += len(chunk)
        if count == 0:
            raise ConfigError(f"{self.directory}: no training clip could be read")
        mean = total / count
        var = np.maximum(squares / count - mean**2, 0.0)
        return torch.from_numpy(mean).float(), torch.from_numpy(var).float()
