"""Step-directory checkpoints: a checkpoint is complete or it does not exist.

Layout under a run's output directory::

    checkpoints/step_<n>/            what the DeepSpeed engine writes for every rank (model, optimizer shards)
    checkpoints/step_<n>/COMPLETE    written by rank 0 after every rank has finished writing

Resuming picks the newest directory with the marker, so a save killed half-way (by preemption, a time limit
or a full disk) is ignored rather than loaded and crashed on. The last ``keep_last`` complete checkpoints are
kept (at least 2: the newest may be the one being written when the job dies); partial ones older than the
newest complete one are removed. Rank and step bookkeeping (sampler position, RNG states, the step) travels in
DeepSpeed's ``client_state``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as torch_dist

MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"step_(\d+)")


def checkpoint_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def step_tag(step: int) -> str:
    return f"step_{step}"


def _steps(output_dir) -> list[tuple[int, Path]]:
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), path) for path in root.iterdir() if (m := _STEP_DIR.fullmatch(path.name))]
    return sorted(found)


def complete_steps(output_dir) -> list[int]:
    """Steps whose checkpoint carries the completion marker, oldest first."""
    return [step for step, path in _steps(output_dir) if (path / MARKER).is_file()]


def latest_complete(output_dir) -> Optional[int]:
    steps = complete_steps(output_dir)
    return steps[-1] if steps else None


def _is_main() -> bool:
    return not torch_dist.is_initialized() or torch_dist.get_rank() == 0


def _barrier() -> None:
    if torch_dist.is_initialized():
        torch_dist.barrier()


def _write_marker(directory: Path, step: int) -> None:
    tmp = directory / f".{MARKER}.tmp"
    tmp.write_text(json.dumps({"step": step, "time": time.time()}) + "\n")
    os.replace(tmp, directory / MARKER)


def _rank() -> int:
    return torch_dist.get_rank() if torch_dist.is_initialized() else 0


def _rank_file(directory: Path, rank: int) -> Path:
    return directory / f"rank_{rank:05d}_state.pt"


def save_checkpoint(engine, output_dir, step: int, client_state: dict[str, Any], keep_last: int = 2,
                    rank_state: Optional[dict[str, Any]] = None) -> Path:
    """Every rank writes its part; the marker goes in only once all have finished; then old ones are pruned.

    ``client_state`` is the same on every rank (DeepSpeed keeps rank 0's); ``rank_state`` is this rank's own
    (its RNG streams), written next to DeepSpeed's files.
    """
    if keep_last < 2:
        raise ValueError(f"keep_last must be >= 2 (the newest may be incomplete when a job dies), got {keep_last}")
    root = checkpoint_root(output_dir)
    directory = root / step_tag(step)
    engine.save_checkpoint(str(root), tag=step_tag(step), client_state=client_state, save_latest=False)
    if rank_state is not None:
        torch.save(rank_state, _rank_file(directory, _rank()))
    _barrier()  # every rank's files are on disk
    if _is_main():
        _write_marker(directory, step)
        prune(output_dir, keep_last)
    _barrier()  # nobody resumes or saves again before the marker and the pruning are done
    return directory


def prune(output_dir, keep_last: int) -> list[Path]:
    """Remove complete checkpoints beyond the newest ``keep_last`` and partial ones older than the newest
    complete one (a partial one newer than that may still be being written by a concurrent save)."""
    complete = complete_steps(output_dir)
    keep = set(complete[-keep_last:])
    newest = complete[-1] if complete else None
    removed = []
    for step, path in _steps(output_dir):
        stale_partial = step not in complete and newest is not None and step < newest
        if (step in complete and step not in keep) or stale_partial:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def load_latest(engine, output_dir) -> Optional[tuple[dict[str, Any], Optional[dict[str, Any]]]]:
    """Load the newest complete checkpoint into ``engine``; returns (client state, this rank's own state or
    None), or None when there is no complete checkpoint."""
    step = latest_complete(output_dir)
    if step is None:
        return None
    directory = checkpoint_root(output_dir) / step_tag(step)
    path, client_state = engine.load_checkpoint(str(checkpoint_root(output_dir)), tag=step_tag(step))
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the complete checkpoint {directory}")
    rank_file = _rank_file(directory, _rank())
    # Our own files hold RNG states (numpy/python objects): written by this code, read back unrestricted.
    rank_state = torch.load(rank_file, weights_only=False) if rank_file.is_file() else None
    return client_state, rank_state


def rng_states() -> dict[str, Any]:
    """Every random stream a training step draws from, for exact resume."""
    import random

    import numpy as np

    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    import random

    import numpy as np

    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def export_weights(state_dict: dict[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Write fp32 weights as one file that loads with ``torch.load(weights_only=True)`` (``.pt``/``.pth``)
    or safetensors (``.safetensors``); written to a temporary name, then renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.detach().float().contiguous().cpu() for name, tensor in state_dict.items()}
    tmp = path.with_name(f".{path.name}.tmp")
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(tensors, str(tmp))
    else:
        torch.save(tensors, tmp)
    os.replace(tmp, path)
    return path


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a file written by :func:`export_weights` (no pickled objects are ever executed)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)
