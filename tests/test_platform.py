"""The platform with a task that is not video classification (tests/toy_task.py: a variable number of boxes per
clip, multi-hot labels, an unreadable item): it trains through the shared launcher and loop, checkpoints, is killed
with SIGKILL mid-epoch and resumes to the uninterrupted run's losses and weights, bit for bit."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.checkpoint import complete_steps

from helpers import run

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = ("run.log_every=1", "run.save_every_steps=2", "run.keep_last=3", "run.save_every_epochs=1")


def command(out: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(ROOT / "tests" / "toy_task.py"), f"run.output_dir={out}", *OVERRIDES, *overrides]


def losses(out: Path) -> dict[int, float]:
    path = out / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.mark.e2e
def test_a_boxes_task_trains_is_killed_and_resumes_bit_exactly(tmp_path):
    reference = tmp_path / "reference"
    run(command(reference))
    expected = losses(reference)
    assert sorted(expected) == list(range(1, 19))  # 24 items / 4 per micro-batch = 6 steps x 3 epochs
    assert len(set(expected.values())) > 10  # it trains on the boxes: the loss moves
    rows = (reference / "unreadable_videos.tsv").read_text().splitlines()[1:]
    assert [row.split("\t")[0] for row in rows] == ["item_5.mp4"]  # named once, counted on every read
    last = json.loads((reference / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["unreadable_videos"] == 3 and "gflops_per_s" not in last  # the task declares no FLOP count

    out = tmp_path / "killed"
    killed = subprocess.run(command(out, "data.die_after_step=9"), cwd=ROOT, capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL
    resume_step = max(complete_steps(out))
    # Killed mid-epoch right after optimizer step 9 (before logging it), one step past its newest checkpoint.
    assert resume_step == 8 and max(losses(out)) == 8

    resumed = run(command(out))
    assert f"resumed from step {resume_step}" in resumed.stderr
    assert losses(out) == expected  # fp32 on CPU: the same losses to the last bit
    got, want = (torch.load(path / "weights.pt", weights_only=True) for path in (out, reference))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
