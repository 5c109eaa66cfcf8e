"""Training never stops on bad files: all-failed micro-batches on one and two ranks, every bad file named once in
``unreadable_videos.tsv`` (kept across a kill + resume), and a global failure counter that survives resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.checkpoint import complete_steps

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "run_scripts" / "configs" / "pretrain" / "tiny_cpu.yaml"
TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")


@pytest.fixture(scope="module")
def bad_list(tmp_path_factory):
    """13 good videos and 3 unreadable ones (truncated, random bytes, missing): 16 lines, so two ranks at one video
    per micro-batch split it without padding and every bad video is an all-failed micro-batch, once per epoch."""
    from datasets.synthetic import SyntheticSpec, ensure_synthetic_dataset

    root = tmp_path_factory.mktemp("data")
    ensure_synthetic_dataset(root, SyntheticSpec(num_videos=20, frames=16, num_classes=4))
    good = [root / line.split()[0] for line in (root / "train.csv").read_text().splitlines()][:13]
    truncated = root / "truncated.mp4"
    truncated.write_bytes(good[0].read_bytes()[: good[0].stat().st_size // 2])
    noise = root / "noise.mp4"
    noise.write_bytes(os.urandom(5000))
    bad = [str(truncated), str(noise), str(root / "missing.mp4")]
    listing = root / "with_bad.csv"
    listing.write_text("".join(f"{path} 0\n" for path in [*map(str, good), *bad]))
    return listing, bad


def command(out: Path, listing: Path, *overrides: str, launcher=(sys.executable,)) -> list[str]:
    return [*launcher, str(ROOT / "run_scripts" / "pretrain.py"), "--config", str(RECIPE), f"run.output_dir={out}",
            f"data.train_list={listing}", "batch.micro_batch=1", "optim.epochs=2", "optim.warmup_epochs=1",
            "run.log_every=1", "run.vis_every_epochs=0", *overrides]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def named(out: Path) -> list[str]:
    lines = (out / "unreadable_videos.tsv").read_text().splitlines()
    assert lines[0] == "path\treason\tstep"
    rows = [line.split("\t") for line in lines[1:]]
    assert all(len(row) == 3 and row[1] for row in rows)  # every file with its reason
    return [row[0] for row in rows]


def last_count(out: Path) -> int:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r][-1]["unreadable_videos"]


def test_one_rank_trains_through_all_failed_micro_batches(tmp_path, bad_list):
    listing, bad = bad_list
    out = tmp_path / "one"
    result = run(command(out, listing))
    assert sorted(named(out)) == sorted(bad)
    assert last_count(out) == 6  # 3 bad videos x 2 epochs
    assert complete_steps(out)[-1] == 32
    log = result.stdout + result.stderr
    assert all(log.count(f"unreadable video (skipped, listed in unreadable_videos.tsv): {path}") == 1 for path in bad)


def test_two_ranks_kill_and_resume_keep_the_list_and_the_count(tmp_path, bad_list):
    listing, bad = bad_list
    out = tmp_path / "two"
    overrides = ("run.save_every_steps=3", "run.keep_last=3")
    process = subprocess.Popen(command(out, listing, *overrides, launcher=TORCHRUN), cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:  # kill in the second epoch (8 steps each)
        if any(step >= 9 for step in complete_steps(out)):
            break
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert max(complete_steps(out)) < 16, "the run finished before it could be killed"
    before = named(out)
    assert sorted(before) == sorted(bad)  # the first epoch named every bad file
    resumed = run(command(out, listing, *overrides, launcher=TORCHRUN))
    assert "resumed from step" in resumed.stdout + resumed.stderr
    assert sorted(named(out)) == sorted(bad)  # the replayed steps named nothing twice
    assert last_count(out) == 6  # global over both ranks, continued from the checkpoint
