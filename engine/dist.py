"""Process-group set-up: one code path for every way a training script is started.

Launchers and what they tell a process (``detect_launch`` reads only the environment):

* ``python script.py`` -- no launcher: rank 0 of 1. No variable is required; a 1-process group
  (gloo on CPU, nccl on CUDA, on 127.0.0.1 and a free port unless MASTER_ADDR/MASTER_PORT are set)
  is created only when asked for with ``init_distributed(require_group=True)``; ``engine.ds.initialize``
  asks for one because DeepSpeed needs a process group even for a single rank.
* ``torchrun`` -- RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT (recognised by TORCHELASTIC_RUN_ID).
* ``deepspeed`` launcher -- the same five variables (recognised by its CROSS_RANK/CROSS_SIZE/LOCAL_SIZE). It
  also appends ``--local_rank=N`` to the script's arguments, which ``engine.launch`` accepts and ignores (the
  rank is read from the environment).
* ``srun`` -- SLURM_PROCID (rank), SLURM_STEP_NUM_TASKS or SLURM_NTASKS (world size), SLURM_LOCALID (local
  rank). The master address is MASTER_ADDR if set, else the first host of SLURM_STEP_NODELIST,
  SLURM_JOB_NODELIST or SLURM_NODELIST (host-list syntax expanded by ``expand_hostlist``); the port is
  MASTER_PORT if set, else ``slurm_port(SLURM_JOB_ID)`` so two jobs sharing a node do not collide.
  Run one task per GPU (``srun --ntasks-per-node=<gpus>``). Start the script with ``srun``: a plain
  ``python`` line in an sbatch script with ``--ntasks=N`` inherits SLURM_PROCID=0 and SLURM_NTASKS=N, looks
  like rank 0 of N and would wait for the N-1 ranks that never start (init_distributed logs who it waits for).

When RANK/WORLD_SIZE are set they win over the Slurm variables, so ``srun torchrun ...`` (one torchrun per
node) works too. Backend: nccl when CUDA is available, gloo otherwise.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal, Optional

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

Launcher = Literal["none", "torchrun", "deepspeed", "srun", "env"]

# Host used for a single-process group when MASTER_ADDR is not set.
LOCALHOST = "127.0.0.1"
# Ports derived from SLURM_JOB_ID lie in [SLURM_PORT_BASE, SLURM_PORT_BASE + SLURM_PORT_SPAN).
SLURM_PORT_BASE = 10000
SLURM_PORT_SPAN = 20000


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job, as the launcher described it."""

    # global rank of this process, 0 .. world_size - 1
    rank: int
    # number of processes in the job
    world_size: int
    # rank within this node; selects the CUDA device
    local_rank: int
    # address of rank 0's rendezvous store
    master_addr: str
    # port of rank 0's rendezvous store; None for a single process until a group is created
    master_port: Optional[int]
    # what started the process: none (plain python), torchrun, deepspeed, srun or env (RANK etc. set by hand)
    launcher: Launcher

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def device(self) -> torch.device:
        """This process's CUDA device when CUDA is available, else the CPU."""
        return torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")


# --------------------------------------------------------------------------
# Reading the launch environment (pure)
# --------------------------------------------------------------------------


def detect_launch(env: Mapping[str, str] = os.environ) -> DistInfo:
    """Rank, world size, local rank and rendezvous address from the launcher's environment variables.

    Pure: reads ``env`` only (no socket, no subprocess). Raises ValueError when the variables are
    inconsistent (RANK without WORLD_SIZE, rank outside the world, a non-integer value, ...).
    """
    if "RANK" in env or "WORLD_SIZE" in env:
        return _from_torch_env(env)
    if "SLURM_PROCID" in env:
        return _from_slurm_env(env)
    port = _env_int(env, "MASTER_PORT", minimum=1) if env.get("MASTER_PORT") else None
    return DistInfo(rank=0, world_size=1, local_rank=0, master_addr=env.get("MASTER_ADDR") or LOCALHOST,
                    master_port=port, launcher="none")


def _from_torch_env(env: Mapping[str, str]) -> DistInfo:
    """torchrun, the deepspeed launcher, or RANK/WORLD_SIZE exported by hand."""
    missing = [k for k in ("RANK", "WORLD_SIZE") if k not in env]
    if missing:
        present = "RANK" if "RANK" in env else "WORLD_SIZE"
        raise ValueError(
            f"{present} is set but {missing[0]} is not: start the script with torchrun or deepspeed, "
            f"or export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT together"
        )
    if "TORCHELASTIC_RUN_ID" in env:
        launcher: Launcher = "torchrun"
    elif any(k in env for k in ("CROSS_RANK", "CROSS_SIZE", "LOCAL_SIZE")):
        launcher = "deepspeed"
    else:
        launcher = "env"
    world_size = _env_int(env, "WORLD_SIZE", minimum=1)
    rank = _env_int(env, "RANK", minimum=0)
    _check_rank(rank, world_size, "RANK", "WORLD_SIZE")
    if "LOCAL_RANK" in env:
        local_rank = _env_int(env, "LOCAL_RANK", minimum=0)
    else:
        local_rank = _default_local_rank(rank, world_size)
    if world_size == 1:
        addr = env.get("MASTER_ADDR") or LOCALHOST
        port = _env_int(env, "MASTER_PORT", minimum=1) if env.get("MASTER_PORT") else None
    else:
        absent = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
        if absent:
            raise ValueError(
                f"WORLD_SIZE={world_size} but {' and '.join(absent)} not set: every rank needs the address "
                f"and port of rank 0 (torchrun and deepspeed set them; export them when launching by hand)"
            )
        addr, port = env["MASTER_ADDR"], _env_int(env, "MASTER_PORT", minimum=1)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, master_addr=addr,
                    master_port=port, launcher=launcher)


def _default_local_rank(rank: int, world_size: int) -> int:
    if world_size == 1:
        return 0
    raise ValueError(
        f"RANK={rank} and WORLD_SIZE={world_size} are set but LOCAL_RANK is not: it picks the GPU; "
        f"export it (torchrun and deepspeed set it)"
    )


def _from_slurm_env(env: Mapping[str, str]) -> DistInfo:
    """A task started by srun (one task per GPU)."""
    count_key = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
    if count_key not in env:
        raise ValueError("SLURM_PROCID is set but neither SLURM_STEP_NUM_TASKS nor SLURM_NTASKS: "
                         "start the script with srun")
    world_size = _env_int(env, count_key, minimum=1)
    rank = _env_int(env, "SLURM_PROCID", minimum=0)
    _check_rank(rank, world_size, "SLURM_PROCID", count_key)
    local_rank = _env_int(env, "SLURM_LOCALID", minimum=0) if "SLURM_LOCALID" in env else 0
    addr, port = slurm_rendezvous(env, required=world_size > 1)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, master_addr=addr,
                    master_port=port, launcher="srun")


def slurm_rendezvous(env: Mapping[str, str] = os.environ, required: bool = True) -> tuple[str, Optional[int]]:
    """MASTER_ADDR and MASTER_PORT of a Slurm job: the exported values if set, else the first host of the node
    list and ``slurm_port(SLURM_JOB_ID)``. Without the Slurm variables: an error when ``required``, else
    (127.0.0.1, None)."""
    if env.get("MASTER_ADDR"):
        addr = env["MASTER_ADDR"]
    else:
        nodelist_key = next(
            (k for k in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST") if env.get(k)), None
        )
        if nodelist_key is None:
            if required:
                raise ValueError(
                    "srun task without SLURM_STEP_NODELIST, SLURM_JOB_NODELIST or SLURM_NODELIST: "
                    "export MASTER_ADDR=<host of rank 0>"
                )
            addr = LOCALHOST
        else:
            try:
                addr = expand_hostlist(env[nodelist_key])[0]
            except ValueError as err:
                raise ValueError(f"{nodelist_key}: {err}; export MASTER_ADDR to bypass it") from None
    if env.get("MASTER_PORT"):
        port: Optional[int] = _env_int(env, "MASTER_PORT", minimum=1)
    elif env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID"):
        key = "SLURM_JOB_ID" if env.get("SLURM_JOB_ID") else "SLURM_JOBID"
        port = slurm_port(_env_int(env, key, minimum=0))
    elif required:
        raise ValueError("srun task without SLURM_JOB_ID: export MASTER_PORT to a free port on rank 0's host")
    else:
        port = None
    return addr, port


def slurm_port(job_id: int) -> int:
    """Rendezvous port for a Slurm job: 10000 + job_id % 20000, so concurrent jobs on one node differ.

    Jobs whose ids differ by a multiple of 20000 would share a port; set MASTER_PORT to override.
    """
    if job_id < 0:
        raise ValueError(f"Slurm job id must be >= 0, got {job_id}")
    return SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN


def _env_int(env: Mapping[str, str], key: str, *, minimum: int) -> int:
    text = env[key]
    try:
        value = int(str(text).strip())
    except ValueError:
        raise ValueError(f"environment variable {key}={text!r} is not an integer") from None
    if value < minimum:
        raise ValueError(f"environment variable {key}={value} must be >= {minimum}")
    return value


def _check_rank(rank: int, world_size: int, rank_key: str, size_key: str) -> None:
    if not 0 <= rank < world_size:
        raise ValueError(f"{rank_key}={rank} is outside [0, {size_key}={world_size})")


# --------------------------------------------------------------------------
# Slurm host lists
# --------------------------------------------------------------------------

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def expand_hostlist(hostlist: str) -> list[str]:
    """Expand Slurm's compressed host-list syntax, keeping order and zero padding.

    ``node[01-03,07],gpu5`` -> node01, node02, node03, node07, gpu5; ``gpu-[1,5-6]x`` -> gpu-1x, gpu-5x,
    gpu-6x; several bracket groups in one name expand as a product (``r[1-2]n[1-2]`` -> r1n1, r1n2, r2n1,
    r2n2). Raises ValueError on unbalanced brackets, empty names or descending ranges.
    """
    hosts: list[str] = []
    for pattern in _split_top_level(hostlist.strip()):
        hosts.extend(_expand_pattern(pattern, hostlist))
    if not hosts:
        raise ValueError(f"empty Slurm host list {hostlist!r}")
    return hosts


def _split_top_level(text: str) -> list[str]:
    """Split at commas that are not inside brackets."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"nested '[' in Slurm host list {text!r}")
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in Slurm host list {text!r}")
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"unbalanced '[' in Slurm host list {text!r}")
    parts.append(text[start:])
    for part in parts:
        if not part.strip():
            raise ValueError(f"empty host name in Slurm host list {text!r}")
    return [p.strip() for p in parts]


def _expand_pattern(pattern: str, whole: str) -> list[str]:
    open_at = pattern.find("[")
    if open_at < 0:
        return [pattern]
    close_at = pattern.index("]", open_at)
    prefix, body, rest = pattern[:open_at], pattern[open_at + 1:close_at], pattern[close_at + 1:]
    tails = _expand_pattern(rest, whole)
    return [prefix + index + tail for index in _expand_ranges(body, whole) for tail in tails]


def _expand_ranges(body: str, whole: str) -> list[str]:
    """'01-03,07' -> ['01', '02', '03', '07'] (zero padding follows the range's first number)."""
    out = []
    for item in body.split(","):
        match = _RANGE.match(item.strip())
        if match is None:
            raise ValueError(f"bad range {item!r} in Slurm host list {whole!r}")
        first, last = match.group(1), match.group(2)
        if last is None:
            out.append(first)
            continue
        lo, hi = int(first), int(last)
        if hi < lo:
            raise ValueError(f"descending range {item!r} in Slurm host list {whole!r}")
        width = len(first)
        out.extend(str(i).zfill(width) for i in range(lo, hi + 1))
    return out


# --------------------------------------------------------------------------
# Process group
# --------------------------------------------------------------------------


def backend_name() -> str:
    """nccl when CUDA is available, gloo otherwise."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def _free_port(host: str = LOCALHOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def init_distributed(require_group: bool = False, timeout_minutes: float = 30.0) -> DistInfo:
    """Set this process up for data-parallel training and return where it sits in the job.

    * Reads the launch with ``detect_launch(os.environ)`` and exports RANK, WORLD_SIZE, LOCAL_RANK,
      MASTER_ADDR and MASTER_PORT (what torch's ``env://`` rendezvous and DeepSpeed read), so an srun task
      looks like a torchrun worker from here on.
    * With CUDA, selects the GPU ``cuda:<local_rank>``.
    * Creates the default process group (nccl with CUDA, gloo without) when world_size > 1, or for a
      single process when ``require_group`` (DeepSpeed needs one even then; a free local port is picked
      when MASTER_PORT is not set). DeepSpeed adopts this group when ``deepspeed.initialize`` runs.
    * Idempotent: a second call, or a call after someone else created the group, only checks that the
      group matches the environment.
    """
    info = detect_launch(os.environ)
    if torch.cuda.is_available():
        if info.local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"local rank {info.local_rank} but only {torch.cuda.device_count()} CUDA device(s) visible: "
                f"start one process per GPU"
            )
        torch.cuda.set_device(info.local_rank)
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() != info.world_size or dist.get_rank() != info.rank:
            raise RuntimeError(
                f"a process group already exists as rank {dist.get_rank()} of {dist.get_world_size()}, "
                f"but the environment says rank {info.rank} of {info.world_size}"
            )
        return info
    if not info.distributed and not require_group:
        return info
    if info.master_port is None:
        info = replace(info, master_port=_free_port())
    _export(info)
    backend = backend_name()
    logger.info(
        "initialising %s process group: rank %d of %d (local rank %d, launcher %s), rendezvous %s:%d",
        backend, info.rank, info.world_size, info.local_rank, info.launcher, info.master_addr, info.master_port,
    )
    kwargs = {}
    if backend == "nccl":
        kwargs["device_id"] = torch.device("cuda", info.local_rank)
    dist.init_process_group(
        backend=backend, init_method="env://", rank=info.rank, world_size=info.world_size,
        timeout=datetime.timedelta(minutes=timeout_minutes), **kwargs,
    )
    return info


def _export(info: DistInfo) -> None:
    os.environ["RANK"] = str(info.rank)
    os.environ["WORLD_SIZE"] = str(info.world_size)
    os.environ["LOCAL_RANK"] = str(info.local_rank)
    os.environ["MASTER_ADDR"] = info.master_addr
    os.environ["MASTER_PORT"] = str(info.master_port)


def get_rank() -> int:
    """Global rank: from the process group when there is one, else from the launch environment."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return detect_launch(os.environ).rank


def get_world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return detect_launch(os.environ).world_size


def is_main_process() -> bool:
    """True on global rank 0 (and in a plain single-process run)."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank; a no-op without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


# This process's gloo group of every rank (see cpu_group), made on first use: (default group it was made in, group).
_cpu_group: Optional[tuple] = None


def cpu_group():
    """A gloo group of every rank, for small agreements made on the host (stop flags, the names of unreadable
    videos): under NCCL a collective of CPU values would copy them to the GPU and wait for it to drain. None
    without a process group of more than one rank. The first call creates the group, a collective itself: make
    it at the same point on every rank."""
    global _cpu_group
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    if _cpu_group is None or _cpu_group[0] is not dist.group.WORLD:  # none yet, or one of a destroyed group
        _cpu_group = (dist.group.WORLD, dist.new_group(backend="gloo"))
    return _cpu_group[1]


def cleanup() -> None:
    """Destroy the default process group if there is one (call once, at the end of training)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------
# Collectives: every one the project runs is here, so that the rest of the code asks for an agreement
# ("the largest count", "every rank's list") and never handles a process group itself.
# --------------------------------------------------------------------------


def group_active() -> bool:
    """A process group of more than one rank: collectives have something to combine."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def group_rank_and_size() -> tuple[int, int]:
    """(this rank, ranks) of the process group, or (0, 1) without a group of several ranks: how work is shared out
    before a collective combines it (the launch environment alone shares nothing: no group, no gather)."""
    return (dist.get_rank(), dist.get_world_size()) if group_active() else (0, 1)


def collective_device() -> torch.device:
    """Where tensors must be for the default group's collectives: the current GPU under NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_gather_objects(value: Any, group=None) -> list:
    """Every rank's ``value`` (picklable), in rank order; ``[value]`` without a group of several ranks. A
    collective: call it at the same point on every rank. ``group``: ``cpu_group()`` for host-side agreements."""
    if not group_active():
        return [value]
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, value, group=group)
    return parts


def sum_over_ranks_(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` replaced, in place, by its sum over the ranks (through the collective device when it lives
    elsewhere); returned for chaining. No gradient: see ``sum_over_ranks`` for that."""
    if group_active():
        buffer = tensor if tensor.device == collective_device() else tensor.to(collective_device())
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
        if buffer is not tensor:
            tensor.copy_(buffer)
    return tensor


def max_over_ranks(value: int) -> int:
    """The largest ``value`` of any rank."""
    if not group_active():
        return value
    tensor = torch.tensor([value], device=collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def any_rank(flags: list[bool]) -> list[bool]:
    """Each flag set where any rank set it, agreed through the host group (``cpu_group``): under NCCL an
    all-reduce of GPU tensors read back on the host would make every step wait for the GPU to drain."""
    group = cpu_group()
    if group is None:
        return list(flags)
    agreed = torch.tensor([float(flag) for flag in flags])
    dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=group)
    return [value > 0 for value in agreed.tolist()]


class _GatherWithGradient(torch.autograd.Function):
    """``all_gather`` of tensors of any first size whose backward sums every rank's gradient for this rank's part (an
    all-reduce then a slice: gloo has no reduce-scatter). Parts are padded to the largest for the collective."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        largest = max(sizes)
        padded = torch.zeros(largest, *x.shape[1:], dtype=x.dtype, device=x.device)
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
        ctx.rank, ctx.sizes, ctx.largest = dist.get_rank(), sizes, largest
        return torch.cat([part[:size] for part, size in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        padded = grad.new_zeros(len(ctx.sizes), ctx.largest, *grad.shape[1:])
        for rank, part in enumerate(grad.split(ctx.sizes)):
            padded[rank, : part.shape[0]] = part
        dist.all_reduce(padded)
        return padded[ctx.rank, : ctx.sizes[ctx.rank]], None


class _AllReduceWithGradient(torch.autograd.Function):
    """The sum over ranks; every rank uses it, so the gradient of each rank's input is the sum of every rank's."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


def gather_with_gradient(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(every rank's ``x`` concatenated in rank order, where this rank's rows start), gradients flowing back to the
    owners; ``(x, 0)`` without a process group of more than one rank."""
    if not group_active():
        return x, 0
    counts = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, torch.tensor([x.shape[0]], device=x.device))
    sizes = [int(c.item()) for c in counts]
    return _GatherWithGradient.apply(x.contiguous(), sizes), sum(sizes[: dist.get_rank()])


def sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """``x`` summed over the ranks, with gradients to every rank's ``x``; ``x`` itself on one rank."""
    return _AllReduceWithGradient.apply(x) if group_active() else x


# --------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------

LOG_FORMAT = "%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s"
LOG_DATEFMT = "%Y-%m-%d %H:%M:%S"


class _RankHandler(logging.StreamHandler):
    """Marks the handler setup_logging installed, so a second call replaces it instead of adding one."""


def setup_logging(rank: int, level: int = logging.INFO) -> logging.Logger:
    """Configure the root logger: ``level`` on rank 0, WARNING (or ``level`` if higher) elsewhere.

    One stderr handler, one format with the rank in it (``... [rank3] WARNING engine.x: ...``). Calling it
    again (e.g. once the rank is known) replaces the handler. Returns the root logger.
    """
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _RankHandler)]:
        root.removeHandler(handler)
    handler = _RankHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT.format(rank=rank), datefmt=LOG_DATEFMT))
    root.addHandler(handler)
    root.setLevel(level if rank == 0 else max(level, logging.WARNING))
    return root


if __name__ == "__main__":
    # For launch scripts (run_scripts/slurm/train.sbatch): eval "$(python -m engine.dist)" exports the rendezvous
    # of the current Slurm job, by the same rule the srun tasks use.
    master_addr, master_port = slurm_rendezvous(os.environ)
    print(f"export MASTER_ADDR={master_addr} MASTER_PORT={master_port}")
