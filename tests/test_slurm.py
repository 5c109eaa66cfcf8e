"""The Slurm launch path on a real (localhost) Slurm: run_scripts/slurm/local_cluster.sh starts munged, slurmctld and
slurmd, and run_scripts/submit.py submits run_scripts/slurm/train.sbatch jobs of the tiny pre-training with two
ranks on CPU (gloo, DeepSpeed ZeRO-2). The cluster has two nodes (two slurmd on this machine, "localhost" and its
host name), and five jobs run side by side:

* ``srun``: one node, one task per rank, uninterrupted -- the reference;
* ``requeued``: two nodes, one task each, sent ``scancel --signal=USR1`` mid-run: it checkpoints, requeues itself
  and finishes with the reference's step count, losses and weights;
* ``torchrun``: one node, one task running torchrun with two workers, equal to the reference;
* ``torchrun_2nodes``: two nodes, a torchrun of one worker on each (node ranks from SLURM_NODEID), equal too;
* ``cancelled``: a plain ``scancel`` (SIGTERM): it checkpoints and stays cancelled.

The daemons are stopped by pid and their directory removed afterwards. The tests use the Slurm already on this
machine and never install system packages unless asked: with INSTALL_SLURM=1 in the environment (what .ci/run sets)
missing slurm-wlm and munge are installed with apt-get (as root), and a cluster that cannot be set up is a failure.
Without it, where Slurm is missing or cannot start, the tests are skipped with the reason and the command that
enables them (printed in the summary: test.sh passes -rs).
"""

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine.checkpoint import complete_steps
from engine.dist import expand_hostlist, slurm_port

from helpers import losses

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "run_scripts" / "slurm" / "local_cluster.sh"
RECIPE = ROOT / "run_scripts" / "configs" / "pretrain" / "tiny_cpu.yaml"
TOTAL_STEPS = 24  # 32 training videos / (4 per rank x 2 ranks) = 4 steps per epoch, 6 epochs
NEEDED = ("slurmctld", "slurmd", "munged", "sbatch", "scontrol", "squeue", "scancel")
# Installing system packages changes the machine for everyone, so a plain test run never does it: CI opts in.
INSTALL = os.environ.get("INSTALL_SLURM", "") not in ("", "0")
ENABLE = "INSTALL_SLURM=1 bash run_scripts/test.sh -k slurm"


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Environment for the Slurm client commands of a localhost cluster started for this module."""
    missing = [name for name in NEEDED if not shutil.which(name)]
    if missing:
        if not INSTALL:
            pytest.skip(f"SLURM TESTS NOT RUN: Slurm is not installed (missing: {', '.join(missing)}); to install "
                        f"slurm-wlm and munge with apt-get (as root) and run them: {ENABLE}")
        install = subprocess.run(["bash", str(CLUSTER), "install"], capture_output=True, text=True, timeout=900)
        assert install.returncode == 0, f"installing slurm-wlm and munge failed:\n{install.stdout}\n{install.stderr}"
    ctld_port, slurmd_port = _free_ports(2)
    env = dict(os.environ, LOCAL_SLURM_DIR=str(tmp_path_factory.mktemp("slurm")), LOCAL_SLURM_NODES="2",
               LOCAL_SLURM_PORTS=f"{ctld_port} {slurmd_port}")
    # A submitting shell with a process's variables in it (sbatch exports them all): train.sbatch must not let
    # every task take rank 1 and every job the same port.
    env.update(RANK="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_ports(1)[0]))
    start = subprocess.run(["bash", str(CLUSTER), "start"], env=env, capture_output=True, text=True, timeout=120)
    if start.returncode != 0 and os.geteuid() != 0 and not INSTALL:
        subprocess.run(["bash", str(CLUSTER), "stop"], env=env, capture_output=True, timeout=120)
        pytest.skip(f"SLURM TESTS NOT RUN: the local cluster did not start as a non-root user (slurmd runs jobs as "
                    f"their owner, which needs root); run them as root: sudo bash run_scripts/test.sh -k slurm\n"
                    f"{start.stdout}{start.stderr}")
    try:
        assert start.returncode == 0, start.stdout + start.stderr
        env["SLURM_CONF"] = str(Path(env["LOCAL_SLURM_DIR"]) / "slurm.conf")
        yield env
    finally:
        subprocess.run(["scancel", "--full", "--user", str(os.getuid())], env=env, capture_output=True)
        _wait(lambda: not _slurm(env, "squeue", "-h", check=False).strip(), 60)
        stop = subprocess.run(["bash", str(CLUSTER), "stop"], env=env, capture_output=True, text=True, timeout=120)
        assert stop.returncode == 0, stop.stdout + stop.stderr


def _slurm(env, *command, check=True) -> str:
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    if check:
        assert result.returncode == 0, f"{' '.join(command)}: {result.stderr}"
    return result.stdout


def _wait(condition, timeout: float, interval: float = 0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    return None


def _job(env, job_id: str) -> dict:
    """``scontrol show job`` as a dict (JobState, Restarts, ...)."""
    text = _slurm(env, "scontrol", "show", "job", "-o", job_id)
    return dict(item.split("=", 1) for item in text.split() if "=" in item)


LAYOUTS = {  # job -> submit.py options: two ranks in every case
    "srun": ("--nodes", "1", "--tasks-per-node", "2"),
    "requeued": ("--nodes", "2", "--tasks-per-node", "1"),
    "torchrun": ("--nodes", "1", "--tasks-per-node", "2", "--launcher", "torchrun"),
    "torchrun_2nodes": ("--nodes", "2", "--tasks-per-node", "1", "--launcher", "torchrun"),
    "cancelled": ("--nodes", "1", "--tasks-per-node", "2"),
}


def _submit(env, out: Path, data_root: Path, layout) -> str:
    command = [sys.executable, str(ROOT / "run_scripts" / "submit.py"), "pretrain", "--config", str(RECIPE),
               "--gpus-per-node", "0", "--cpus-per-task", "1", "--partition", "local", "--time", "30:00", *layout,
               "--sbatch-option=--hold",  # released together once all are queued (submitting takes seconds)
               f"run.output_dir={out}", f"data.root={data_root}",
               "data.synthetic={num_videos: 40, frames: 16, num_classes: 4}", "batch.micro_batch=4",
               "optim.epochs=6", "optim.warmup_epochs=1", "run.log_every=1", "run.save_every_epochs=2",
               "run.vis_every_epochs=0"]
    result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    job_id = re.search(r"submitted job (\d+)", result.stdout).group(1)
    assert f"log: {out}/slurm-{job_id}.out" in result.stdout
    return job_id


@pytest.fixture(scope="module")
def jobs(cluster, tmp_path_factory):
    """Submit the five jobs, signal two of them mid-run, wait for all; what each left behind."""
    from datasets.synthetic.motion import SyntheticSpec, ensure_synthetic_dataset

    base = tmp_path_factory.mktemp("jobs")
    data_root = base / "data"
    ensure_synthetic_dataset(data_root, SyntheticSpec(num_videos=40, frames=16, num_classes=4))
    outs = {name: base / name for name in LAYOUTS}
    ids = {name: _submit(cluster, outs[name], data_root, layout) for name, layout in LAYOUTS.items()}
    _slurm(cluster, "scontrol", "release", ",".join(ids.values()))
    most_running = [0]  # the most of these jobs seen running at once

    def watch():
        running = _slurm(cluster, "squeue", "-h", "-t", "RUNNING", "-o", "%i").split()
        most_running[0] = max(most_running[0], len(set(running) & set(ids.values())))

    # Signal mid-run, once training is under way (a signal before the handler is installed would kill the job).
    signalled = {}
    def reached(name, step):
        watch()
        state = _job(cluster, ids[name])["JobState"]
        log = outs[name] / f"slurm-{ids[name]}.out"
        assert state in ("PENDING", "RUNNING"), f"job {name} is {state}:\n{log.read_text()[-4000:]}"
        return max(losses(outs[name]), default=0) >= step and max(losses(outs[name]))

    for name, flag in (("requeued", "--signal=USR1"), ("cancelled", None)):
        step = _wait(lambda: reached(name, 3), 600)
        assert step, f"job {name} did not reach step 3: {_job(cluster, ids[name])}"
        _slurm(cluster, *(["scancel", flag, ids[name]] if flag else ["scancel", ids[name]]))
        signalled[name] = step
    # Slurm holds a requeued job for ~2 minutes (its BeginTime); release it now to keep the test short.
    assert _wait(lambda: _job(cluster, ids["requeued"]).get("Restarts") == "1", 120), "the job did not requeue"
    _slurm(cluster, "scontrol", "update", f"JobId={ids['requeued']}", "StartTime=now")

    def all_done():
        watch()
        states = {name: _job(cluster, job)["JobState"] for name, job in ids.items()}
        return states if all(s in ("COMPLETED", "CANCELLED", "FAILED", "TIMEOUT") for s in states.values()) else None

    states = _wait(all_done, 900, interval=1)
    assert states, {name: _job(cluster, job) for name, job in ids.items()}
    logs = {name: (outs[name] / f"slurm-{ids[name]}.out").read_text() for name in ids}
    return {"ids": ids, "outs": outs, "states": states, "logs": logs, "signalled": signalled,
            "restarts": {name: _job(cluster, job)["Restarts"] for name, job in ids.items()},
            "most_running": most_running[0]}


@pytest.mark.e2e
def test_a_two_task_zero2_job_runs_to_completion(jobs):
    assert jobs["states"]["srun"] == "COMPLETED", jobs["logs"]["srun"][-3000:]
    out = jobs["outs"]["srun"]
    assert max(losses(out)) == TOTAL_STEPS and max(complete_steps(out)) == TOTAL_STEPS
    assert (out / "weights.pt").is_file()
    log = jobs["logs"]["srun"]
    assert "'world_size': 2" in log and "zero stage ZeroStageEnum.gradients, world_size: 2" in log


@pytest.mark.e2e
def test_the_signalled_job_requeues_itself_and_ends_equal_to_the_uninterrupted_one(jobs):
    log = jobs["logs"]["requeued"]
    assert jobs["states"]["requeued"] == "COMPLETED" and jobs["restarts"]["requeued"] == "1", log[-3000:]
    stopped = re.findall(r"\[rank(\d)\] WARNING train: stopping on SIGUSR1 after step (\d+), whose checkpoint is "
                         r"complete", log)
    assert {rank for rank, _ in stopped} == {"0", "1"} and len({step for _, step in stopped}) == 1, log[-3000:]
    step = int(stopped[0][1])
    assert jobs["signalled"]["requeued"] <= step <= jobs["signalled"]["requeued"] + 2 < TOTAL_STEPS
    assert f"requeueing Slurm job {jobs['ids']['requeued']} (restart 1)" in log
    assert f"resumed from step {step} " in log
    nodes = re.search(r"\(restart 1\) on (\S+): pretrain", log).group(1)  # the same script, started again
    assert sorted(expand_hostlist(nodes)) == sorted([socket.gethostname().split(".")[0], "localhost"])

    reference, requeued = jobs["outs"]["srun"], jobs["outs"]["requeued"]
    assert max(complete_steps(requeued)) == TOTAL_STEPS
    assert losses(requeued) == losses(reference)  # every step once, bit-identical (fp32 on CPU)
    got, expected = (torch.load(out / "weights.pt", weights_only=True) for out in (requeued, reference))
    assert all(torch.equal(got[k], expected[k]) for k in expected)


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["torchrun", "torchrun_2nodes"])
def test_one_torchrun_per_node_trains_like_one_task_per_rank(jobs, name):
    log = jobs["logs"][name]
    assert jobs["states"][name] == "COMPLETED", log[-3000:]
    assert "launcher torchrun" in log and "[rank1]" in log
    assert losses(jobs["outs"][name]) == losses(jobs["outs"]["srun"])


@pytest.mark.e2e
def test_a_cancelled_job_checkpoints_and_is_not_requeued(jobs):
    log = jobs["logs"]["cancelled"]
    assert jobs["states"]["cancelled"] == "CANCELLED" and jobs["restarts"]["cancelled"] == "0", log[-3000:]
    step = int(re.search(r"stopping on SIGTERM after step (\d+), whose checkpoint is complete", log).group(1))
    assert "not requeued" in log
    assert max(complete_steps(jobs["outs"]["cancelled"])) == step


@pytest.mark.e2e
def test_concurrent_jobs_on_one_node_use_different_ports(jobs):
    assert jobs["most_running"] >= 2, "the jobs never ran at the same time"
    ports = {name: int(re.search(r"rendezvous \S+:(\d+)\)", log).group(1)) for name, log in jobs["logs"].items()}
    assert ports == {name: slurm_port(int(job)) for name, job in jobs["ids"].items()}
    assert len(set(ports.values())) == len(ports)
