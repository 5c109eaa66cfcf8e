"""Training never stops on bad files: all-failed micro-batches on one and two ranks (and in fine-tuning) train on
blank clips with zero weight, every bad file is named once in the log and in ``unreadable_videos.tsv`` (kept
across a kill + resume), and the failure counter is global and survives the resume."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from datasets.sampler import ResumableDistributedSampler
from datasets.video_dataset import Failure
from engine.checkpoint import complete_steps
from engine.unreadable import FILE_NAME, HEADER, UnreadableLog, read_unreadable

from helpers import run

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = ROOT / "run_scripts" / "configs" / "pretrain" / "tiny_cpu.yaml"
FINETUNE = ROOT / "run_scripts" / "configs" / "finetune" / "tiny_cpu.yaml"
TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")

# ---- the record of failures, in one process --------------------------------------------------------------------


def failure(path: str, reason: str = "cannot open") -> Failure:
    return Failure(0, path, reason)


def test_each_file_is_named_once_with_its_first_step_and_reason(tmp_path, caplog):
    record = UnreadableLog(tmp_path, is_main=True)
    record.add([failure("/v/b.mp4", "no\tsuch\nfile"), failure("/v/a.mp4")], step=3, epoch=0)
    record.add([failure("/v/b.mp4")], step=2, epoch=0)  # gathered together: the earlier step is the first sighting
    assert record.gather() == 3
    record.add([failure("/v/a.mp4")], step=9, epoch=1)
    assert record.gather() == 1 and record.gather() == 0
    rows = read_unreadable(tmp_path)
    assert rows == [{"path": "/v/b.mp4", "reason": "cannot open", "step": 2, "epoch": 0},
                    {"path": "/v/a.mp4", "reason": "cannot open", "step": 3, "epoch": 0}]
    assert (tmp_path / FILE_NAME).read_text().splitlines()[0] == HEADER
    assert [m for m in caplog.messages if "unreadable video" in m] == [
        f"unreadable video at step 2 (epoch 0), skipped and listed in {FILE_NAME}: /v/b.mp4: cannot open",
        f"unreadable video at step 3 (epoch 0), skipped and listed in {FILE_NAME}: /v/a.mp4: cannot open"]


def test_a_resumed_run_names_nothing_twice_and_recovers_a_row_cut_by_a_kill(tmp_path):
    odd = "/v/tab\there\nand a newline \\ backslash.mp4"
    first = UnreadableLog(tmp_path, is_main=True)
    first.add([failure(odd, "bad  header"), failure("/v/a.mp4")], step=1, epoch=0)
    first.gather()
    with open(tmp_path / FILE_NAME, "a") as handle:
        handle.write("/v/cut.mp4\tcannot op")  # a kill in the middle of the next row
    assert [row["path"] for row in read_unreadable(tmp_path)] == ["/v/a.mp4", odd]  # by step, then path

    resumed = UnreadableLog(tmp_path, is_main=True)  # the replay meets all three again
    resumed.add([failure(odd), failure("/v/a.mp4"), failure("/v/cut.mp4")], step=4, epoch=0)
    assert resumed.gather() == 3
    rows = read_unreadable(tmp_path)
    assert [(row["path"], row["reason"], row["step"]) for row in rows] == [
        ("/v/a.mp4", "cannot open", 1), (odd, "bad header", 1), ("/v/cut.mp4", "cannot open", 4)]
    assert len((tmp_path / FILE_NAME).read_text().splitlines()) == 4  # header + three rows, each on its own line


def test_other_ranks_keep_no_file(tmp_path):
    record = UnreadableLog(tmp_path, is_main=False)
    record.add([failure("/v/a.mp4")], step=1, epoch=0)
    assert record.gather() == 1 and not (tmp_path / FILE_NAME).exists()


# ---- training runs ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """13 good videos and 3 unreadable ones (truncated, random bytes, missing) as the last 3 of 16 lines: two ranks
    at one video per micro-batch split them without padding, so each bad video fails once per epoch."""
    from datasets.synthetic.motion import SyntheticSpec, ensure_synthetic_dataset

    root = tmp_path_factory.mktemp("data")
    ensure_synthetic_dataset(root, SyntheticSpec(num_videos=20, frames=16, num_classes=4))
    lines = (root / "train.csv").read_text().splitlines()[:13]
    first = root / lines[0].split()[0]
    truncated = root / "truncated.mp4"
    truncated.write_bytes(first.read_bytes()[: first.stat().st_size // 2])
    noise = root / "noise.mp4"
    noise.write_bytes(random.Random(0).randbytes(5000))
    bad = [str(truncated), str(noise), str(root / "missing.mp4")]
    listing = root / "with_bad.csv"
    listing.write_text("".join(f"{line}\n" for line in lines) + "".join(f"{path} 1\n" for path in bad))
    return root, listing, bad


BAD = range(13, 16)  # the indices of the bad videos in the list


def plan(seed: int, world: int, micro: int, accum: int, epochs: int) -> dict[int, list[list[list[int]]]]:
    """step (from 1) -> for every rank, its micro-batches in that step, each a list of video indices."""
    steps = {}
    for epoch in range(epochs):
        shares = []
        for rank in range(world):
            sampler = ResumableDistributedSampler(16, world, rank, seed=seed)
            sampler.set_epoch(epoch)
            indices = sampler.epoch_indices()
            shares.append([indices[i:i + micro] for i in range(0, len(indices), micro)])
        per_epoch = len(shares[0]) // accum
        for k in range(per_epoch):
            steps[epoch * per_epoch + k + 1] = [share[k * accum:(k + 1) * accum] for share in shares]
    return steps


def all_failed(micro_batch: list[int]) -> bool:
    return all(i in BAD for i in micro_batch)


def first_sightings(steps: dict, bad: list[str], epochs: int) -> dict[str, tuple[int, int]]:
    """bad path -> (step, epoch) of the first micro-batch holding it."""
    seen = {}
    for step in sorted(steps):
        for micro_batches in steps[step]:
            for i in (i for micro_batch in micro_batches for i in micro_batch if i in BAD):
                seen.setdefault(bad[i - BAD.start], (step, (step - 1) * epochs // len(steps)))
    return seen


def pretrain_command(out: Path, data, *overrides: str, launcher=(sys.executable,)) -> list[str]:
    root, listing, _ = data
    return [*launcher, str(ROOT / "run_scripts" / "pretrain.py"), "--config", str(PRETRAIN), f"run.output_dir={out}",
            f"data.root={root}", "data.synthetic=null", f"data.train_list={listing}", "batch.micro_batch=1",
            "optim.epochs=2", "optim.warmup_epochs=1", "run.log_every=1", "run.vis_every_epochs=0", *overrides]


def output_of(cmd: list[str]) -> str:
    """What a successful run of ``cmd`` printed, standard output then standard error."""
    result = run(cmd)
    return result.stdout + result.stderr


def train_records(out: Path) -> dict[int, dict]:
    """step -> the training record of that step (the last one written: a resumed run logs replayed steps again)."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if "lr" in r}


def check_run(out: Path, log: str, steps: dict, bad: list[str], epochs: int) -> None:
    """Every bad file named once (log and file) at its first sighting, the global count, and for every step: a loss
    where rank 0 decoded something, a zero gradient exactly where no rank did."""
    rows = read_unreadable(out)
    assert {row["path"]: (row["step"], row["epoch"]) for row in rows} == first_sightings(steps, bad, epochs)
    assert len(rows) == len(bad) and all(row["reason"] for row in rows)
    assert all(log.count(f"listed in {FILE_NAME}: {path}: ") == 1 for path in bad), log[-3000:]
    records = train_records(out)
    assert sorted(records) == sorted(steps)
    failed = 0
    for step, ranks in steps.items():
        decoded = [not all(map(all_failed, micro_batches)) for micro_batches in ranks]
        assert ("loss" in records[step]) == decoded[0], (step, records[step])
        assert (records[step]["grad_norm"] == 0) == (not any(decoded)), (step, records[step])
        failed += sum(i in BAD for micro_batches in ranks for micro_batch in micro_batches for i in micro_batch)
        assert records[step]["unreadable_videos"] == failed, (step, records[step])  # summed over ranks, so far
    assert failed == len(bad) * epochs


def kill_9(torchrun: subprocess.Popen) -> None:
    """SIGKILL the torchrun agent and its workers, as a failing node would: the workers run in sessions of their
    own, so killing the agent's process group would leave them training."""
    workers = [int(pid) for children in Path(f"/proc/{torchrun.pid}/task").glob("*/children")
               for pid in children.read_text().split()]
    for pid in [torchrun.pid, *workers]:
        os.kill(pid, signal.SIGKILL)
    torchrun.wait()
    deadline = time.time() + 30
    while any(map(running, workers)) and time.time() < deadline:  # SIGKILL lands asynchronously
        time.sleep(0.05)


def running(pid: int) -> bool:
    """Not dead yet: neither gone nor a zombie waiting for whoever adopted it to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.e2e
def test_one_rank_trains_through_all_failed_micro_batches(tmp_path, data):
    """Seed 2, two micro-batches of one video per step: at step 7 both failed (a zero gradient, no loss shown); at
    steps 1, 13, 14 and 15 one of them did (the other one's loss shown)."""
    _, _, bad = data
    steps = plan(seed=2, world=1, micro=1, accum=2, epochs=2)
    assert [s for s, (micro_batches,) in steps.items() if all(map(all_failed, micro_batches))] == [7]
    out = tmp_path / "one"
    log = output_of(pretrain_command(out, data, "run.seed=2", "batch.grad_accum=2"))
    check_run(out, log, steps, bad, epochs=2)
    assert complete_steps(out)[-1] == 16
    weights = torch.load(out / "weights.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in weights.values())


@pytest.mark.e2e
def test_two_ranks_zero3_kill_and_resume_keep_the_list_and_the_count(tmp_path, data):
    """ZeRO-3 gathers parameters in every forward and backward: a rank that skipped its all-failed micro-batch would
    hang the other (the timeout would fail this test). Seed 0: one rank's micro-batch fails at steps 4, 5, 6 and 9,
    both ranks' at step 16. Killed after the checkpoint of step 9 or 12, the resumed run replays step 16 (whose
    videos were named in the first epoch) and counts on from the checkpoint."""
    _, _, bad = data
    steps = plan(seed=0, world=2, micro=1, accum=1, epochs=2)
    failing = {s: [all(map(all_failed, micro_batches)) for micro_batches in ranks] for s, ranks in steps.items()}
    assert {s: f for s, f in failing.items() if any(f)} == {4: [True, False], 5: [False, True], 6: [True, False],
                                                            9: [False, True], 16: [True, True]}
    out = tmp_path / "two"
    overrides = ("ds.template=zero3_fp32", "run.save_every_steps=3", "run.keep_last=3")
    with open(tmp_path / "killed.log", "w") as killed_log:
        process = subprocess.Popen(pretrain_command(out, data, *overrides, launcher=TORCHRUN), cwd=ROOT,
                                   stdout=killed_log, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while time.time() < deadline and process.poll() is None:
            if any(step >= 9 for step in complete_steps(out)):
                break
            time.sleep(0.05)
        kill_9(process)
    resumed_from = max(complete_steps(out))
    assert 9 <= resumed_from < 16, f"not killed in the second epoch (newest checkpoint: step {resumed_from})"
    killed = (tmp_path / "killed.log").read_text()
    assert len(read_unreadable(out)) == 3  # the first epoch named every bad file

    resumed = output_of(pretrain_command(out, data, *overrides, launcher=TORCHRUN))
    assert f"resumed from step {resumed_from}" in resumed
    assert "unreadable video" not in resumed  # step 16's videos were named before the kill
    check_run(out, killed + resumed, steps, bad, epochs=2)


@pytest.mark.e2e
def test_fine_tuning_with_mixup_trains_through_failed_micro_batches(tmp_path, data):
    """Two videos per micro-batch and mixup/cutmix, which pair clips, with an EMA. Seed 6: at step 2 both videos
    failed (blank clips, zero weight); at step 3 one did (its one clip paired with itself)."""
    root, listing, bad = data
    steps = plan(seed=6, world=1, micro=2, accum=1, epochs=1)
    assert {s: sum(i in BAD for i in mb) for s, ((mb,),) in steps.items() if set(mb) & set(BAD)} == {2: 2, 3: 1}
    out = tmp_path / "finetune"
    log = output_of([sys.executable, str(ROOT / "run_scripts" / "finetune.py"), "--config", str(FINETUNE),
               f"run.output_dir={out}", f"data.root={root}", "data.synthetic=null", f"data.train_list={listing}",
               "model.num_classes=4", "data.num_classes=4", "batch.micro_batch=2", "optim.epochs=1",
               "optim.warmup_epochs=0", "mixup.mixup_alpha=0.8", "mixup.cutmix_alpha=1.0", "ema.decay=0.9",
               "eval.every_epochs=0", "eval.final_test=false", "run.log_every=1", "run.seed=6"])
    check_run(out, log, steps, bad, epochs=1)
    for name in ("weights.pt", "weights_ema.pt"):
        weights = torch.load(out / name, weights_only=True)
        assert all(torch.isfinite(t).all() for t in weights.values()), name
