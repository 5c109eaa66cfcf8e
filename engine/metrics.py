"""Training metrics: one record per logging step to the console, ``metrics.jsonl`` and TensorBoard (rank 0).

Values that need a device sync (the loss, the grad norm) are turned into Python numbers only at logging
steps; between them the loop keeps tensors.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import time
from pathlib import Path
from typing import Any, Optional

import torch

log = logging.getLogger("train")


def peak_memory_gib() -> float:
    """Peak memory of this process: allocated device memory on GPU, resident set size on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class Throughput:
    """Clips/s and the time share spent waiting for data, over the steps since the last ``read()``."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.clips = 0
        self.data_wait = 0.0

    def add(self, clips: int, data_wait: float) -> None:
        self.clips += clips
        self.data_wait += data_wait

    def read(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        values = {"clips_per_s": self.clips / elapsed, "data_wait": self.data_wait / elapsed}
        self.reset()
        return values


def utilization(train_flops_per_clip: float, clips_per_s: float, peak_flops: Optional[float]) -> dict:
    """Achieved model FLOP/s, and MFU when the device's peak is known (GPU); on CPU only the former."""
    achieved = train_flops_per_clip * clips_per_s
    values = {"gflops_per_s": achieved / 1e9}
    if peak_flops:
        values["mfu"] = achieved / peak_flops
    return values


class MetricsWriter:
    """Appends metric records to ``metrics.jsonl`` and TensorBoard, and logs a console line; no-op off rank 0."""

    def __init__(self, output_dir: str | os.PathLike, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self._tb = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(Path(output_dir) / "tb"))

    def write(self, step: int, values: dict[str, Any], prefix: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, **{key: _plain(value) for key, value in values.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(f"{prefix}/{key}", value, step)
        log.info("%s step %d  %s", prefix, step, "  ".join(_format(k, v) for k, v in record.items() if k != "step"))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(output_dir: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item()
    return value


def _format(key: str, value: Any) -> str:
    if isinstance(value, float):
        return f"{key} {value:.4g}"
    return f"{key} {value}"
