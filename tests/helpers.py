"""What many tests do: run an entry point as a user would (a subprocess in the repository root) and check how it
ended; build its command line from a recipe and overrides; read its metrics; kill it at a chosen moment; make a
tiny model and give it random weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from engine.checkpoint import complete_steps
from models.vit import ViTConfig

ROOT = Path(__file__).resolve().parents[1]
# the synthetic motion dataset most end-to-end tests train on: 40 videos of 16 frames, 4 classes
SYNTHETIC = "{num_videos: 40, frames: 16, num_classes: 4}"
SCRIPTS = ROOT / "run_scripts"
CONFIGS = SCRIPTS / "configs"


def entry_command(script: str, recipe: Path, out: Path, *overrides: str, launcher=(sys.executable,)) -> list[str]:
    """``run_scripts/<script>`` on ``recipe`` writing to ``out``, with the ``key=value`` overrides in order;
    ``launcher``: what starts it (``python``, or ``python -m torch.distributed.run --nproc_per_node 2``)."""
    return [*launcher, str(SCRIPTS / script), "--config", str(recipe), f"run.output_dir={out}", *overrides]


def run(cmd: list[str], expect: int = 0, timeout: int = 400, **kwargs) -> subprocess.CompletedProcess:
    """``cmd`` from the repository root, its output captured; fails the test (with the output's tail) unless it
    exits with ``expect``."""
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert result.returncode == expect, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def records(out: Path) -> list[dict]:
    """The run's metrics.jsonl records (none before it exists)."""
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def losses(out: Path) -> dict[int, float]:
    """step -> training loss, the last record of each step winning (a resumed run logs the replayed steps again);
    validation records carry no loss."""
    return {r["step"]: r["loss"] for r in records(out) if "loss" in r}


def wait_for_step(process: subprocess.Popen, out: Path, step: int, timeout: float = 240) -> int:
    """Wait until the run writing to ``out`` logged ``step`` (or later); returns the newest logged step."""
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        seen = max(losses(out), default=0)
        if seen >= step:
            return seen
        time.sleep(0.05)
    raise AssertionError(f"the run ended or stalled before step {step} (exit code {process.poll()})")


def kill_after_checkpoint(process: subprocess.Popen, out: Path, checkpoint: int, step: int,
                          timeout: float = 240) -> None:
    """SIGKILL the run (its whole process group) once the checkpoint of step ``checkpoint`` is complete and training
    logged step ``step``."""
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if checkpoint in complete_steps(out) and max(losses(out), default=0) >= step:
            break
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def debug_vit(**overrides) -> ViTConfig:
    """The tiny ViT of the unit tests: ``vit_debug`` over 8 frames of 32x32 pixels in 8x8 patches."""
    return ViTConfig(**{"arch": "vit_debug", "num_frames": 8, "img_size": 32, "patch_size": 8, **overrides})


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random values for every parameter, biases and norms included, so that a dropped, zeroed or mis-mapped weight
    shows; the LayerNorm scales stay near 1, their usual scale."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=generator))
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.add_(1.0)
    return model
