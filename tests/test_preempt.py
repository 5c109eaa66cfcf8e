"""Preemption without a scheduler: signal handling, rank agreement, the requeue command, and a real pre-training
run stopped by a signal that resumes to the uninterrupted result (the Slurm side is tests/test_slurm.py)."""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from engine import preempt
from engine.checkpoint import complete_steps
from engine.config import ConfigError, load_config
from engine.preempt import PREEMPTED_EXIT_CODE, PreemptionGuard, parse_signal, requeue_slurm_job
from engine.tasks.pretrain import PretrainConfig

from helpers import losses, run, wait_for_step
from test_pretrain import RECIPE, ROOT, command

TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29641")


def test_signal_names_parse_and_bad_ones_are_config_errors():
    assert parse_signal("SIGUSR1") is signal.SIGUSR1
    assert parse_signal("usr2") is signal.SIGUSR2
    assert parse_signal("") is None
    with pytest.raises(ValueError, match="SIGKILL"):
        parse_signal("KILL")
    with pytest.raises(ConfigError, match=r"run.*'SIGFOO'.*SIGUSR1"):
        load_config(PretrainConfig, str(RECIPE), ["run.requeue_signal=SIGFOO"])
    with pytest.raises(ConfigError, match="both SIGTERM"):
        load_config(PretrainConfig, str(RECIPE), ["run.requeue_signal=TERM"])


def test_guard_records_signals_and_restores_the_previous_handlers():
    before = signal.getsignal(signal.SIGUSR1)
    guard = PreemptionGuard("SIGUSR1", "SIGTERM").install()
    try:
        assert guard.poll() is None
        os.kill(os.getpid(), signal.SIGTERM)
        request = guard.poll()
        assert request is not None and not request.requeue and request.signal_name == "SIGTERM"
        os.kill(os.getpid(), signal.SIGUSR1)
        request = guard.poll()
        assert request.requeue and request.signal_name == "SIGUSR1"  # a requeue wins over a plain stop
    finally:
        guard.uninstall()
    assert signal.getsignal(signal.SIGUSR1) is before
    assert PreemptionGuard("", "").poll() is None
    # Clusters whose preemption sends only SIGTERM: SIGTERM requeues.
    guard = PreemptionGuard("SIGTERM", "").install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.poll().requeue
    finally:
        guard.uninstall()


def test_install_is_once_per_process_and_keeps_what_was_received():
    try:
        guard = preempt.install("SIGUSR1", "SIGTERM")
        os.kill(os.getpid(), signal.SIGUSR1)
        assert preempt.install("SIGUSR1", "SIGTERM") is guard and guard.poll().requeue
        other = preempt.install("SIGUSR2", "SIGTERM")  # other signals: a new guard
        assert other is not guard and other.poll() is None
    finally:
        preempt.uninstall()
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL


def test_a_forked_worker_survives_the_signal_and_leaves_the_decision_to_its_parent():
    guard = PreemptionGuard("SIGUSR1", "SIGTERM").install()
    try:
        pid = os.fork()
        if pid == 0:  # like a DataLoader worker: Slurm signals every process of the step
            os.kill(os.getpid(), signal.SIGUSR1)
            os.kill(os.getpid(), signal.SIGTERM)
            os._exit(0 if not guard.received else 3)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0  # not killed, and it recorded nothing
        assert guard.poll() is None
    finally:
        guard.uninstall()


def test_requeue_runs_scontrol_with_the_job_id_and_reports_failures(tmp_path):
    assert "not a Slurm job" in requeue_slurm_job({})
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/args\n[ "$2" = 42 ] || {{ echo "Invalid job id" >&2; '
                        "exit 1; }\n")
    scontrol.chmod(0o755)
    path = f"{bin_dir}:{os.environ['PATH']}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATH", path)
        assert requeue_slurm_job({"SLURM_JOB_ID": "42", "SLURM_RESTART_COUNT": "2"}) == \
            "requeued Slurm job 42 (restart 3)"
        assert (tmp_path / "args").read_text().split() == ["requeue", "42"]
        failed = requeue_slurm_job({"SLURM_JOB_ID": "7"})
        assert "exit code 1" in failed and "Invalid job id" in failed and "resubmit" in failed
        mp.setenv("PATH", str(tmp_path / "nowhere"))
        assert "failed" in requeue_slurm_job({"SLURM_JOB_ID": "42"})


OVERRIDES = ("optim.epochs=3", "batch.num_workers=1")  # the loader's worker process receives the signal too


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_root) -> Path:
    out = tmp_path_factory.mktemp("reference")
    run(command(out, data_root, *OVERRIDES))
    return out


@pytest.mark.e2e
@pytest.mark.parametrize("sig", ["SIGUSR1", "SIGTERM"])
def test_a_signal_mid_run_checkpoints_that_step_and_the_rerun_equals_the_uninterrupted_run(tmp_path, data_root,
                                                                                          reference, sig):
    out = tmp_path / "stopped"
    process = subprocess.Popen(command(out, data_root, *OVERRIDES), cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen = wait_for_step(process, out, 3)
    os.killpg(process.pid, getattr(signal, sig))  # every process, loader workers included, as Slurm does
    output, _ = process.communicate(timeout=120)
    assert process.returncode == PREEMPTED_EXIT_CODE, output[-3000:]
    stopped = int(re.search(rf"stopping on {sig} after step (\d+), whose checkpoint is complete", output).group(1))
    assert seen <= stopped <= seen + 2  # the step under way finishes; nothing after it is lost
    assert max(complete_steps(out)) == stopped and stopped < 24
    assert "nothing requeued" in output if sig == "SIGUSR1" else "run the same command again" in output

    resumed = run(command(out, data_root, *OVERRIDES))
    assert f"resumed from step {stopped}" in resumed.stderr
    assert losses(out) == losses(reference)  # bit-identical on CPU in fp32


@pytest.mark.e2e
def test_two_ranks_stop_after_the_same_step_when_only_one_is_signalled(tmp_path, data_root):
    out = tmp_path / "two"
    process = subprocess.Popen(command(out, data_root, "optim.epochs=4", launcher=TORCHRUN), cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_step(process, out, 2)
    rank1 = _worker_with_rank(process.pid, 1)
    os.kill(rank1, signal.SIGUSR1)
    output, _ = process.communicate(timeout=120)
    stopped = set(re.findall(r"\[rank(\d)\] WARNING [\w.]+: stopping on SIGUSR1 after step (\d+)", output))
    assert {rank for rank, _ in stopped} == {"0", "1"}, output[-3000:]
    assert len({step for _, step in stopped}) == 1  # the same step on both ranks
    assert max(complete_steps(out)) == int(stopped.pop()[1])


def _worker_with_rank(torchrun_pid: int, rank: int) -> int:
    """The torchrun worker (a direct child of the agent) whose RANK is ``rank``."""
    for child in Path(f"/proc/{torchrun_pid}/task/{torchrun_pid}/children").read_text().split():
        environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(child)
    raise AssertionError(f"no worker with RANK={rank} under torchrun pid {torchrun_pid}")


def _signalled_while_starting(worker_id: int) -> None:
    """A worker_init_fn that receives SIGTERM first: as when Slurm's signal lands between torch installing its
    worker handler (which dies of a SIGTERM its parent did not send) and ours."""
    os.kill(os.getpid(), signal.SIGTERM)
    preempt.shield_worker(worker_id)


@pytest.mark.parametrize("held", [True, False])
def test_a_loader_worker_signalled_while_it_starts_survives_only_when_its_start_is_held(held):
    from torch.utils.data import DataLoader

    preempt.install("SIGUSR1", "SIGTERM")
    try:
        loader = DataLoader(list(range(8)), batch_size=2, num_workers=1, worker_init_fn=_signalled_while_starting)
        if held:
            with preempt.workers_starting():
                batches = iter(loader)
            assert [batch.tolist() for batch in batches] == [[0, 1], [2, 3], [4, 5], [6, 7]]
        else:
            with pytest.raises(RuntimeError, match="DataLoader worker .* (killed by signal|exited unexpectedly)"):
                list(loader)
    finally:
        preempt.uninstall()
