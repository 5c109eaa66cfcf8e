"""engine.dist: launcher detection from fake environments, Slurm host lists and ports, single-process init, logging."""

import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as torch_dist

from engine import dist
from engine.dist import DistInfo, detect_launch, expand_hostlist, slurm_port

LAUNCH_VARS = (
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
    "CROSS_RANK", "CROSS_SIZE", "LOCAL_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS",
    "SLURM_LOCALID", "SLURM_JOB_ID", "SLURM_JOBID", "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST",
)


# --------------------------------------------------------------------------
# detect_launch
# --------------------------------------------------------------------------


def test_plain_python_is_rank_0_of_1_without_any_variable():
    assert detect_launch({}) == DistInfo(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1",
                                         master_port=None, launcher="none")
    assert detect_launch({"MASTER_PORT": "1234"}).master_port == 1234


def test_torchrun():
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1",
           "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "none"}
    assert detect_launch(env) == DistInfo(rank=5, world_size=8, local_rank=1, master_addr="10.0.0.1",
                                          master_port=29500, launcher="torchrun")


def test_deepspeed_launcher():
    env = {"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "MASTER_ADDR": "host-a", "MASTER_PORT": "29600",
           "CROSS_RANK": "1", "CROSS_SIZE": "2", "LOCAL_SIZE": "2"}
    assert detect_launch(env) == DistInfo(rank=2, world_size=4, local_rank=0, master_addr="host-a",
                                          master_port=29600, launcher="deepspeed")


def test_variables_exported_by_hand():
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    assert detect_launch(env).launcher == "env"
    # A single rank needs neither the rendezvous address nor LOCAL_RANK.
    assert detect_launch({"RANK": "0", "WORLD_SIZE": "1"}) == DistInfo(0, 1, 0, "127.0.0.1", None, "env")


def test_srun_reads_slurm_variables_and_first_host():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456",
           "SLURM_JOB_NODELIST": "node[01-03]", "SLURM_NODELIST": "node[01-03]"}
    assert detect_launch(env) == DistInfo(rank=5, world_size=8, local_rank=1, master_addr="node01",
                                          master_port=10000 + 123456 % 20000, launcher="srun")


@pytest.mark.parametrize("nodelist, first", [("a,b", "a"), ("gpu-[1,5-6]x", "gpu-1x"), ("node[07,01-03]", "node07")])
def test_srun_master_is_first_host_of_the_list(nodelist, first):
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "7",
           "SLURM_NODELIST": nodelist}
    assert detect_launch(env).master_addr == first


def test_srun_prefers_the_step_over_the_job_and_explicit_master_variables():
    env = {"SLURM_PROCID": "1", "SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "1",
           "SLURM_JOB_ID": "9", "SLURM_JOB_NODELIST": "n[1-4]", "SLURM_STEP_NODELIST": "n[3-4]"}
    info = detect_launch(env)
    assert (info.world_size, info.master_addr, info.master_port) == (4, "n3", slurm_port(9))
    env.update(MASTER_ADDR="login1", MASTER_PORT="4242")
    assert (detect_launch(env).master_addr, detect_launch(env).master_port) == ("login1", 4242)


def test_launcher_variables_win_over_slurm():
    """`srun torchrun ...`: one torchrun per node; its workers carry both sets of variables."""
    env = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "3",
           "SLURM_NODELIST": "n[1-2]", "RANK": "7", "WORLD_SIZE": "16", "LOCAL_RANK": "7",
           "MASTER_ADDR": "n1", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "x"}
    info = detect_launch(env)
    assert (info.rank, info.world_size, info.launcher) == (7, 16, "torchrun")


@pytest.mark.parametrize("env, message", [
    ({"RANK": "0"}, "RANK is set but WORLD_SIZE is not"),
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE is set but RANK is not"),
    ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1"},
     r"RANK=2 is outside \[0, WORLD_SIZE=2\)"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "MASTER_ADDR and MASTER_PORT not set"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "LOCAL_RANK is not"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "1"}, "export MASTER_ADDR"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_NODELIST": "a"}, "export MASTER_PORT"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "1", "SLURM_NODELIST": "a[1-"},
     "SLURM_NODELIST: unbalanced"),
])
def test_inconsistent_environments_are_errors_that_say_what_to_set(env, message):
    with pytest.raises(ValueError, match=message):
        detect_launch(env)


# --------------------------------------------------------------------------
# Slurm host lists and ports
# --------------------------------------------------------------------------


@pytest.mark.parametrize("hostlist, hosts", [
    ("node[01-03]", ["node01", "node02", "node03"]),
    ("a,b", ["a", "b"]),
    ("gpu-[1,5-6]x", ["gpu-1x", "gpu-5x", "gpu-6x"]),
    ("node[01-03,07],gpu5", ["node01", "node02", "node03", "node07", "gpu5"]),
    ("node[8-11]", ["node8", "node9", "node10", "node11"]),
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
    ("single", ["single"]),
    ("x[009-010],y[1]", ["x009", "x010", "y1"]),
])
def test_expand_hostlist(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


@pytest.mark.parametrize("bad", ["node[1-3", "node]1", "node[3-1]", "a,,b", "n[a-b]", "n[[1]]", ""])
def test_malformed_hostlists_are_rejected(bad):
    with pytest.raises(ValueError):
        expand_hostlist(bad)


def test_slurm_port_differs_between_jobs_and_stays_in_range():
    assert slurm_port(123456) != slurm_port(123457)
    assert slurm_port(123456) == slurm_port(123456)
    assert all(10000 <= slurm_port(j) < 30000 for j in (0, 1, 19999, 20000, 10**9))
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_NODELIST": "a"}
    ports = {detect_launch(dict(env, SLURM_JOB_ID=str(job))).master_port for job in (500, 501)}
    assert len(ports) == 2


# --------------------------------------------------------------------------
# init_distributed in a single process
# --------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch):
    for key in LAUNCH_VARS:
        monkeypatch.delenv(key, raising=False)
    assert not torch_dist.is_initialized()
    yield monkeypatch
    dist.cleanup()


def test_single_process_needs_no_group_and_no_master_address(clean_env):
    info = dist.init_distributed()
    assert (info.rank, info.world_size, info.launcher) == (0, 1, "none")
    assert not torch_dist.is_initialized()
    assert dist.is_main_process() and dist.get_world_size() == 1
    dist.barrier()  # a no-op without a group


def test_single_process_group_on_request(clean_env):
    info = dist.init_distributed(require_group=True)
    assert torch_dist.is_initialized() and torch_dist.get_world_size() == 1
    assert torch_dist.get_backend() == dist.backend_name() == "gloo"
    assert info.master_port is not None and os.environ["MASTER_PORT"] == str(info.master_port)
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("0", "1", "0")
    assert dist.init_distributed(require_group=True) == detect_launch(os.environ)  # idempotent
    dist.barrier()
    assert dist.is_main_process()
    dist.cleanup()
    assert not torch_dist.is_initialized()


# --------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------


@pytest.fixture
def root_logger():
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield root
    root.handlers[:] = handlers
    root.setLevel(level)


def test_setup_logging_levels_and_rank_prefix(root_logger, capsys):
    dist.setup_logging(0)
    assert root_logger.level == logging.INFO
    dist.setup_logging(3)  # replaces its handler instead of adding a second one
    assert root_logger.level == logging.WARNING
    assert sum(isinstance(h, dist._RankHandler) for h in root_logger.handlers) == 1
    log = logging.getLogger("engine.test")
    log.info("hidden on rank 3")
    log.warning("shown on every rank")
    err = capsys.readouterr().err
    assert "hidden" not in err
    assert "[rank3] WARNING engine.test: shown on every rank" in err


# --------------------------------------------------------------------------
# Two processes started the way srun starts them (gloo, no DeepSpeed)
# --------------------------------------------------------------------------

SRUN_SCRIPT = """
import torch
import torch.distributed as torch_dist
from engine import dist

info = dist.init_distributed()
value = torch.tensor([float(info.rank + 1)])
torch_dist.all_reduce(value)
dist.barrier()
print(f"{info.launcher} {info.rank}/{info.world_size} local={info.local_rank} "
      f"at={info.master_addr}:{info.master_port} sum={value.item():g}")
dist.cleanup()
"""


def _free_slurm_job_id():
    """A job id whose derived port is free on this machine."""
    for job_id in range(4242, 4242 + 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", slurm_port(job_id)))
            except OSError:
                continue
            return job_id
    pytest.skip("no free port in the Slurm-derived range")


@pytest.mark.e2e
def test_two_srun_tasks_rendezvous_on_the_first_host_and_derived_port(tmp_path):
    script = tmp_path / "srun_task.py"
    script.write_text(SRUN_SCRIPT)
    job_id = _free_slurm_job_id()
    base = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    base["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + base.get("PYTHONPATH", "")
    procs = [
        subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(base, SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank),
                                  SLURM_JOB_ID=str(job_id), SLURM_JOB_NODELIST="localhost,node[2-3]"))
        for rank in range(2)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    lines = sorted(out.strip().splitlines()[-1] for out, _ in outputs)
    port = slurm_port(job_id)
    assert lines == [f"srun {r}/2 local={r} at=localhost:{port} sum=3" for r in range(2)]


def test_work_is_shared_out_by_the_group_not_by_the_launch_variables(monkeypatch):
    """Without a process group nothing gathers the shares afterwards: an evaluation run in a launcher's environment
    (an sbatch job, torchrun variables in a notebook) still scores everything itself."""
    from engine.dist import group_rank_and_size

    for env in ({"RANK": "1", "WORLD_SIZE": "4"}, {"SLURM_PROCID": "2", "SLURM_NTASKS": "4"}):
        with monkeypatch.context() as patch:
            for key, value in env.items():
                patch.setenv(key, value)
            assert group_rank_and_size() == (0, 1)
