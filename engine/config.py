"""Typed, strict configuration for the entry points: dataclass defaults, a yaml recipe, ``key.sub=value`` overrides.

How a run's configuration is built (later wins): the dataclass defaults (``engine.launch`` passes the task's root
config class), the recipe (``--config``, holding only what differs from the defaults), then each command-line
override. OmegaConf structured configs do the typing: ``1e-3`` is a float, ``[0.9, 0.95]`` fills a tuple,
``Literal`` fields accept only their choices, and a mapping given for a section updates it key by key. What this
module adds is the error a user can act on: an unknown key names its dotted path, where it came from (the recipe
or the one override that holds it), the closest valid key and all valid keys there; a dataclass's own checks
(``__post_init__``) are reported with the section's path.

Values computed from the config (global batch, scaled lr, step counts, token grid) come from ``derive()`` only and
are returned as a separate ``Derived`` record, never written back into user fields: ``config.yaml`` shows what the
user asked for and ``derived.yaml`` what that amounted to.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from datasets.files import write_text_atomic

if TYPE_CHECKING:
    from engine.optim import OptimConfig

class ConfigError(ValueError):
    """A configuration is malformed; the message says where and how to fix it."""


@dataclass
class BatchConfig:
    """How many videos/clips each rank processes per (micro-)step."""

    # videos decoded per rank per micro-step (one forward/backward)
    micro_batch: int = 8
    # micro-steps accumulated into one optimizer step
    grad_accum: int = 1
    # clips cut from each decoded video (MAE-ST repeated sampling); 1 = off
    repeats: int = 1
    # DataLoader worker processes per rank
    num_workers: int = 8

    def __post_init__(self) -> None:
        require(self.micro_batch >= 1, f"micro_batch must be >= 1, got {self.micro_batch}")
        require(self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}")
        require(self.repeats >= 1, f"repeats must be >= 1, got {self.repeats}")
        require(self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}")


def require(condition: bool, message: str) -> None:
    """Raise the ValueError that the loader prefixes with the sub-config's path."""
    if not condition:
        raise ValueError(message)


# --------------------------------------------------------------------------
# Derived values
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Derived:
    """Values computed from the config by derive(); logged and saved, never edited."""

    # data-parallel ranks
    world_size: int
    # videos per optimizer step: micro_batch x grad_accum x world_size
    global_batch: int
    # clips per rank per micro-step: micro_batch x repeats (what the model sees)
    clips_per_micro_step: int
    # clips per optimizer step: global_batch x repeats
    global_clips: int
    # batch the linear lr rule scales by: global_clips or global_batch
    lr_scale_batch: int
    # peak lr reached after warmup
    lr: float
    # True when lr = blr x lr_scale_batch / 256; False when optim.lr was given
    lr_scaled: bool
    # absolute final lr of the cosine decay
    min_lr: float
    # absolute lr at the first warmup step
    warmup_lr: float
    # optimizer steps per epoch; None when the dataset size was not given
    steps_per_epoch: Optional[int] = None
    # epochs x steps_per_epoch
    total_steps: Optional[int] = None
    # warmup_epochs x steps_per_epoch
    warmup_steps: Optional[int] = None
    # epochs x repeats: passes over the data in clips, MAE-ST's "effective epochs" (100 x 4 = 400)
    effective_epochs: Optional[int] = None
    # (T / tubelet, H / patch, W / patch); None when the geometry was not given
    token_grid: Optional[tuple[int, int, int]] = None
    # T' x H' x W' patch tokens per clip (before masking)
    tokens_per_clip: Optional[int] = None

    def as_dict(self) -> dict:
        """Plain-type dict for logging and derived.yaml."""
        return to_dict(self)


def derive(
    batch: BatchConfig,
    optim: OptimConfig,
    world_size: int,
    *,
    num_train_samples: Optional[int] = None,
    token_grid: Optional[Sequence[int]] = None,
) -> Derived:
    """Compute every value that follows from the config and the launch.

    Batch vocabulary:
      * ``batch.micro_batch`` counts *videos* per rank per micro-step; with
        ``batch.repeats = r`` each video yields r clips, so the model sees
        ``micro_batch x r`` clips per micro-step.
      * ``global_batch`` (videos per optimizer step)
        = micro_batch x grad_accum x world_size.

    Learning rate (linear scaling rule, per 256):
      * ``lr = blr x lr_scale_batch / 256`` unless ``optim.lr`` is set, in
        which case it is used unchanged.
      * ``lr_scale_batch = global_batch`` by default: MAE-ST *pre-training*
        convention, where repeated clips of one video do not count as extra
        batch for lr scaling.
      * ``lr_scale_batch = global_batch x repeats`` when
        ``optim.lr_scale_with_repeats``: MAE-ST *fine-tuning* convention, which
        scales by every clip in the step.
      * ``min_lr`` and ``warmup_lr`` are absolute (VideoMAE), never scaled.

    Schedule lengths (only when ``num_train_samples``, in videos, is given):
      * ``steps_per_epoch = ceil(N / (micro_batch x world_size)) // grad_accum``.
        The ceil matches a DistributedSampler that pads every rank to
        ceil(N / world_size) videos and a loader that keeps the last partial
        micro-batch; the floor by grad_accum means a trailing incomplete
        accumulation window does not count as a step, so the training loop
        must end the epoch after ``steps_per_epoch x grad_accum`` micro-steps.
      * ``total_steps = epochs x steps_per_epoch``;
        ``warmup_steps = warmup_epochs x steps_per_epoch``.
      * With repeated sampling an epoch is one pass over the *videos*, each cut
        into ``repeats`` clips, so the model sees ``epochs x repeats`` clips
        per video (``effective_epochs``, the number MAE-ST quotes).

    Token grid: passed through from the model config (``ViTConfig.grid``, the
    one place that knows the tubelet and patch sizes) so it is logged and saved
    with the other derived values.
    """
    _check_positive_int("world_size", world_size)
    global_batch = batch.micro_batch * batch.grad_accum * world_size
    global_clips = global_batch * batch.repeats
    lr_scale_batch = global_clips if optim.lr_scale_with_repeats else global_batch
    lr, lr_scaled = _peak_lr(optim, lr_scale_batch)
    steps = _schedule_lengths(batch, optim, world_size, num_train_samples)
    grid = tuple(token_grid) if token_grid is not None else None
    return Derived(
        world_size=world_size,
        global_batch=global_batch,
        clips_per_micro_step=batch.micro_batch * batch.repeats,
        global_clips=global_clips,
        lr_scale_batch=lr_scale_batch,
        lr=lr,
        lr_scaled=lr_scaled,
        min_lr=optim.min_lr,
        warmup_lr=optim.warmup_lr,
        steps_per_epoch=steps[0],
        total_steps=steps[1],
        warmup_steps=steps[2],
        effective_epochs=optim.epochs * batch.repeats,
        token_grid=grid,
        tokens_per_clip=math.prod(grid) if grid is not None else None,
    )


def _peak_lr(optim: OptimConfig, lr_scale_batch: int) -> tuple[float, bool]:
    """(peak lr, whether it came from the linear scaling rule)."""
    if optim.lr is not None:
        return optim.lr, False
    return optim.blr * lr_scale_batch / 256, True


def _schedule_lengths(
    batch: BatchConfig, optim: OptimConfig, world_size: int, num_train_samples: Optional[int]
) -> tuple[Optional[int], Optional[int], Optional[int]]:
    """(steps_per_epoch, total_steps, warmup_steps), all None without a dataset size."""
    if num_train_samples is None:
        return None, None, None
    _check_positive_int("num_train_samples", num_train_samples)
    micro_steps = math.ceil(num_train_samples / (batch.micro_batch * world_size))
    steps_per_epoch = micro_steps // batch.grad_accum
    if steps_per_epoch == 0:
        raise ConfigError(
            f"num_train_samples={num_train_samples} gives {micro_steps} micro-step(s) per rank "
            f"per epoch, fewer than grad_accum={batch.grad_accum}: no optimizer step would happen"
        )
    return steps_per_epoch, optim.epochs * steps_per_epoch, optim.warmup_epochs * steps_per_epoch


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


# --------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------


def load_config(cls: type, recipe: Union[str, Path, Mapping, None] = None, overrides: Sequence[str] = ()) -> Any:
    """An instance of the dataclass ``cls``: its defaults, updated by ``recipe`` (a yaml path or a mapping), then by
    each ``a.b.c=value`` override in order. Raises ConfigError with a message that names the key and its origin."""
    merged = OmegaConf.structured(cls)
    if recipe is not None:
        source = "the given mapping" if isinstance(recipe, Mapping) else str(recipe)
        data = recipe if isinstance(recipe, Mapping) else _read_recipe(Path(recipe))
        merged = _merge(merged, data, source)
    touched: dict[str, str] = {}  # dotted key of each override -> its label, for errors of whole sections
    for override in overrides:
        key = _override_key(override)
        touched[key] = f"command-line override '{override}'"
        merged = _merge(merged, OmegaConf.from_dotlist([override]), touched[key])
    return _instantiate(merged, "", str(recipe) if isinstance(recipe, (str, Path)) else "", touched)


def _read_recipe(path: Path) -> Any:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid yaml: {err}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"the top level of {path} must be a mapping of config keys, got {data!r}")
    return data or {}  # an empty recipe means "all defaults"


def _override_key(override: str) -> str:
    """The dotted key an override sets; OmegaConf would take ``optim.lr`` without ``=`` as ``optim.lr=null``."""
    key, equals, _ = override.partition("=")
    if not equals or not key.strip() or any(not part for part in key.strip().split(".")):
        raise ConfigError(f"override {override!r} must look like key.subkey=value")
    return key.strip()


def _merge(base: DictConfig, update: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, update)
    except ConfigKeyError as err:
        raise ConfigError(_unknown_key(err, source)) from None
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        where = f"config key '{key}' in {source}" if key else source
        raise ConfigError(f"{where}: {_first_line(err)}") from None


def _unknown_key(err: ConfigKeyError, source: str) -> str:
    """'unknown config key ... in SOURCE (did you mean ...?); valid keys under ...: ...' from OmegaConf's error."""
    dotted, owner = str(err.full_key), err.object_type
    parent, _, key = dotted.rpartition(".")
    valid = [f.name for f in dataclasses.fields(owner)] if dataclasses.is_dataclass(owner) else []
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean '{_join(parent, close[0])}'?)" if close else ""
    level = f"under '{parent}'" if parent else "at top level"
    return f"unknown config key '{dotted}' in {source}{hint}; valid keys {level}: {', '.join(valid)}"


def _instantiate(node: DictConfig, path: str, recipe: str, touched: Mapping[str, str]) -> Any:
    """The dataclass instance of ``node``. Sub-sections are built first, so a ``__post_init__`` error is reported
    with the innermost section that raised it (OmegaConf alone would not say which section it was)."""
    for key in node:
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none() and OmegaConf.get_type(child) is not dict:
            _instantiate(child, _join(path, str(key)), recipe, touched)
    try:
        return OmegaConf.to_object(node)
    except (ValueError, TypeError, OmegaConfBaseException) as err:
        origins = [label for key, label in touched.items() if not path or key == path or key.startswith(path + ".")]
        source = " with ".join(filter(None, [recipe or "the defaults", ", ".join(origins)]))
        section = f"'{path}'" if path else f"(top level {OmegaConf.get_type(node).__name__})"
        raise ConfigError(f"invalid config {section} from {source}: {_first_line(err)}") from None


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    # OmegaConf leaves its placeholders unfilled for an item of a list or tuple; the source names the value.
    return text.replace("Value '$VALUE' of type '$VALUE_TYPE'", "an item")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# --------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------


def to_dict(cfg: Any) -> dict:
    """Plain dict/list/scalar tree of a dataclass instance (tuples become lists): what config.yaml holds, and what
    ``load_config(type(cfg), to_dict(cfg)) == cfg`` reads back."""
    return _lists(OmegaConf.to_container(OmegaConf.structured(cfg)))


def _lists(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _lists(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_lists(item) for item in value]
    return value


def save_config(cfg: Any, out_dir: Union[str, Path], derived: Union[Mapping, Derived, None] = None) -> list[Path]:
    """Write ``config.yaml`` (the resolved config) and, if given, ``derived.yaml``, each atomically (rank 0 only)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"config.yaml": to_dict(cfg)}
    if derived is not None:
        files["derived.yaml"] = derived.as_dict() if isinstance(derived, Derived) else dict(derived)
    for name, data in files.items():
        write_text_atomic(out / name, yaml.safe_dump(data, sort_keys=False, default_flow_style=False))
    return [out / name for name in files]
