"""Step-directory checkpoints: a checkpoint is complete or it does not exist.

Layout under a run's output directory::

    checkpoints/step_<n>/            what the DeepSpeed engine writes for every rank (model, optimizer shards)
    checkpoints/step_<n>/COMPLETE    written by rank 0 after every rank has finished writing

Resuming picks the newest directory with the marker, so a save killed half-way (by preemption, a time limit
or a full disk) is ignored rather than loaded and crashed on. The last ``keep_last`` complete checkpoints are
kept (at least 2: the newest may be the one being written when the job dies); partial ones older than the
newest complete one are removed. Rank and step bookkeeping (sampler position, RNG states, the step) travels in
DeepSpeed's ``client_state``.

``read_checkpoint`` reads weights of any origin for fine-tuning (exported files, step directories, official
VideoMAE releases, Hugging Face directories) without running code from their pickles.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import torch

from datasets.files import atomic_path, write_text_atomic
from engine.dist import barrier, get_rank, is_main_process

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


def _write_marker(directory: Path, step: int) -> None:
    # Not synced: the shards DeepSpeed just wrote are not either, so syncing the marker alone would promise nothing.
    write_text_atomic(directory / MARKER, json.dumps({"step": step, "time": time.time()}) + "\n", fsync=False)


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
        torch.save(rank_state, _rank_file(directory, get_rank()))
    barrier()  # every rank's files are on disk
    if is_main_process():
        _write_marker(directory, step)
        prune(output_dir, keep_last)
    barrier()  # nobody resumes or saves again before the marker and the pruning are done
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
    rank_file = _rank_file(directory, get_rank())
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
    # Not synced, like the checkpoints: the rename is what keeps a killed writer from leaving a truncated file.
    with atomic_path(path, fsync=False) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(tensors, str(tmp))
        else:
            torch.save(tensors, tmp)
    return path


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a file written by :func:`export_weights` (through :func:`read_checkpoint`: nothing pickled runs)."""
    return dict(read_checkpoint(path))


# ---- reading checkpoints of any origin -------------------------------------------------------------------------

# Globals that released checkpoints pickle besides tensors and plain containers (which torch's weights-only
# unpickler allows on its own). Each only rebuilds a record; none runs code chosen by the file:
#   argparse.Namespace   official VideoMAE / VideoMAE V2 / MAE-ST ``save_model`` stores the command line as ``args``
#   numpy scalar, dtype  epochs, accuracies or loss scales saved as numpy numbers: a scalar is rebuilt from its
#                        dtype and raw bytes; the dtype classes are listed because unpickling sets their state.
# Only numeric and bool dtypes: no object arrays, no numpy arrays at all.


def _numpy_globals() -> list:
    import numpy as np

    try:
        from numpy._core.multiarray import scalar  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import scalar
    codes = "?" + np.typecodes["AllInteger"] + np.typecodes["AllFloat"]
    dtype_classes = {type(np.dtype(code)) for code in codes} - {np.dtype}
    # Files written under numpy 1.x name the scalar numpy.core.multiarray.scalar, under 2.x numpy._core....
    aliases = [(scalar, f"{module}.scalar") for module in ("numpy.core.multiarray", "numpy._core.multiarray")]
    return [*aliases, np.dtype, *sorted(dtype_classes, key=lambda c: c.__name__)]


def allowed_globals() -> list:
    """The allow-list of :func:`read_checkpoint`, as ``torch.serialization.safe_globals`` takes it."""
    import argparse

    return [argparse.Namespace, *_numpy_globals()]


def _allowing(extra_globals: list = ()):
    """Context: the weights-only unpickler also accepts the allow-list and ``extra_globals``."""
    return torch.serialization.safe_globals([*allowed_globals(), *extra_globals])


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint whose pickle names a global outside the allow-list: loading it would run code from the file."""


def _unsafe_globals(path: Path, extra_globals: list) -> list[str]:
    """Globals of a torch.save file beyond torch's defaults and the allow-list ([] when it cannot be scanned)."""
    try:
        with _allowing(extra_globals):
            return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # not a zip-format torch.save file, or an opcode the scanner does not know
        return []


def _refusal(paths: list[Path], error: Exception, extra_globals: list = ()) -> Exception:
    found = {path: names for path in paths if (names := _unsafe_globals(path, extra_globals))}
    if not found:  # not a question of globals (a damaged file, ...): torch's own message says what
        return pickle.UnpicklingError(f"cannot read checkpoint {', '.join(map(str, paths))}: {error}")
    where = "; ".join(f"{path} needs {', '.join(names)}" for path, names in found.items())
    return UnsafeCheckpointError(
        f"refused: {where}, not on the allow-list (argparse.Namespace, numpy scalars and dtypes"
        f"{', DeepSpeed records' if extra_globals else ''}); loading it would run code from the pickle. If you "
        f"trust the file, load it yourself and save only its tensors (torch.save(state_dict, path))"
    )


def _torch_load(path: Path) -> Any:
    try:
        with _allowing():
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise _refusal([path], error) from error


@contextlib.contextmanager
def _weights_only_everywhere(extra_globals: list):
    """Every ``torch.load`` inside, also those asking for ``weights_only=False`` (DeepSpeed's reader), runs
    torch's weights-only unpickler with our allow-list plus ``extra_globals``."""
    names = ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    saved = {name: os.environ.pop(name, None) for name in names}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with _allowing(extra_globals):
            yield
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value


def _read_deepspeed(directory: Path) -> dict[str, torch.Tensor]:
    if _STEP_DIR.fullmatch(directory.name) and not (directory / MARKER).is_file():
        raise ValueError(f"{directory} has no {MARKER} marker: that save did not finish; use another step")
    from engine import ds

    records = ds.checkpoint_globals()
    try:
        with _weights_only_everywhere(records):
            return ds.fp32_state_dict_from_checkpoint(directory.parent, directory.name)
    except pickle.UnpicklingError as error:
        raise _refusal(sorted(directory.glob("*_states.pt")), error, records) from error


_HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # save_pretrained's names, preferred first


def _read_hf(directory: Path) -> Optional[dict[str, torch.Tensor]]:
    """The weights of a ``save_pretrained`` directory (sharded ones included); None when there are none."""
    for name in _HF_WEIGHTS:
        if (directory / name).is_file():
            return dict(read_checkpoint(directory / name))
        index = directory / f"{name}.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return {k: v for shard in shards for k, v in read_checkpoint(directory / shard).items()}
    return None


def read_checkpoint(path: str | os.PathLike) -> Mapping[str, Any]:
    """The contents of a checkpoint of any origin we load from, without running code from it.

    * ``*.safetensors``: read with safetensors.
    * Any other file (``weights.pt``, official VideoMAE / V2 ``.pth``, ``pytorch_model.bin``): ``torch.load``
      with ``weights_only=True`` and the allow-list of :func:`allowed_globals` (``argparse.Namespace``, numpy
      scalars); a file needing any other global raises :class:`UnsafeCheckpointError` naming it.
    * A Hugging Face ``save_pretrained`` directory: its ``model.safetensors`` or ``pytorch_model.bin``.
    * A DeepSpeed checkpoint directory (ours: ``runs/<run>/checkpoints/step_<n>``, which must carry the
      ``COMPLETE`` marker): the fp32 weights, ZeRO partitions gathered (``engine.ds``). DeepSpeed's reader
      asks for full unpickling; it is held to the weights-only unpickler too, plus DeepSpeed's record classes.

    Returns what the file holds (a state dict, or a checkpoint dict around one): pass it to
    ``models.convert.load_into_classifier`` or ``unwrap_state_dict``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.is_dir():
        if any(path.glob("*_model_states.pt")):
            return _read_deepspeed(path)
        weights = _read_hf(path)
        if weights is not None:
            return weights
        hint = f" (did you mean {path / 'weights.pt'}?)" if (path / "weights.pt").is_file() else ""
        raise ValueError(
            f"{path} is a directory but neither a DeepSpeed checkpoint (*_model_states.pt, e.g. "
            f"runs/<run>/checkpoints/step_<n>) nor a Hugging Face save_pretrained directory "
            f"({' or '.join(_HF_WEIGHTS)}){hint}"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return _torch_load(path)
