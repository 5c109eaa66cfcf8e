"""Typed, strict configuration for training entry points.

How a run's configuration is built (precedence: CLI > yaml > defaults):

1. Defaults live in code, as dataclass field defaults.
2. A yaml recipe holds only the *differences* from those defaults.
3. Command-line overrides are ``a.b.c=value`` strings; ``value`` is parsed with
   ``yaml.safe_load`` (so ``[0.9, 0.95]``, ``null``, ``true`` work) and then
   coerced by the field's annotation like any yaml value.

Strictness is the point: an unknown key, a wrong type or an invalid value is an
error that names the full dotted key, where it came from and what would have
been accepted. A typo in a recipe must never silently fall back to a default.

Values computed from the config (global batch, scaled lr, step counts, token
grid) come from ``derive()`` only and are returned as a separate ``Derived``
record; they are never written back into user fields, so ``config.yaml`` always
shows what the user asked for and ``derived.yaml`` what that amounted to.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import sys
import tempfile
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import yaml

__all__ = [
    "ConfigError",
    "BatchConfig",
    "RunConfig",
    "Derived",
    "derive",
    "from_dict",
    "apply_overrides",
    "load_config",
    "to_dict",
    "save_config",
    "parse_cli",
    "USAGE",
]


class ConfigError(ValueError):
    """A configuration is malformed; the message says where and how to fix it."""


# --------------------------------------------------------------------------
# Shared sub-configs
# --------------------------------------------------------------------------


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
        _require(self.micro_batch >= 1, f"micro_batch must be >= 1, got {self.micro_batch}")
        _require(self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}")
        _require(self.repeats >= 1, f"repeats must be >= 1, got {self.repeats}")
        _require(self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}")


@dataclass
class RunConfig:
    """Bookkeeping for one run: where it writes, how often, how reproducibly."""

    # human-readable run name (used in logs)
    name: str = "default"
    # directory for config.yaml, derived.yaml, logs and checkpoints
    output_dir: str = "runs/default"
    # base random seed (each rank offsets it by its rank)
    seed: int = 0
    # log training metrics every this many optimizer steps
    log_every: int = 20
    # save a checkpoint every this many epochs (and always after the last one)
    save_every_epochs: int = 20
    # also save every this many optimizer steps, for mid-epoch resume; 0 = only at epoch ends
    save_every_steps: int = 0
    # write reconstruction pictures to vis/ every this many epochs (and after the last one); 0 = never
    vis_every_epochs: int = 20
    # compile the model with torch.compile (inductor) through DeepSpeed; first steps are slower
    compile: bool = False
    # number of most recent periodic checkpoints to keep on disk
    keep_last: int = 2
    # on this signal: checkpoint after the current step, requeue the Slurm job, exit (sbatch --signal=USR1@180);
    # "" = not handled
    requeue_signal: str = "SIGUSR1"
    # on this signal: checkpoint after the current step and exit, no requeue (scancel, preemption, time limit)
    stop_signal: str = "SIGTERM"

    def __post_init__(self) -> None:
        _require(self.seed >= 0, f"seed must be >= 0, got {self.seed}")
        _require(self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}")
        _require(
            self.save_every_epochs >= 1,
            f"save_every_epochs must be >= 1, got {self.save_every_epochs}",
        )
        _require(self.save_every_steps >= 0, f"save_every_steps must be >= 0, got {self.save_every_steps}")
        _require(self.vis_every_epochs >= 0, f"vis_every_epochs must be >= 0, got {self.vis_every_epochs}")
        # The newest checkpoint may be the one a dying job was writing: keep one more.
        _require(self.keep_last >= 2, f"keep_last must be >= 2, got {self.keep_last}")
        from engine.preempt import PreemptionGuard

        PreemptionGuard(self.requeue_signal, self.stop_signal)  # names checked at load time, not at the signal


def _require(condition: bool, message: str) -> None:
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
        raise ValueError(
            f"num_train_samples={num_train_samples} gives {micro_steps} micro-step(s) per rank "
            f"per epoch, fewer than grad_accum={batch.grad_accum}: no optimizer step would happen"
        )
    return steps_per_epoch, optim.epochs * steps_per_epoch, optim.warmup_epochs * steps_per_epoch


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


# --------------------------------------------------------------------------
# Where a value came from (for error messages)
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Sources:
    """Names the origin of each dotted key: the recipe file or one CLI override."""

    # label for values not set on the command line ('' when unknown)
    default: str = ""
    # dotted key -> label of the override that set it
    overrides: Mapping[str, str] = field(default_factory=dict)

    def of_key(self, dotted: str) -> str:
        # A key inside a mapping set by an override (a.b={c: 1}) came from it too.
        key = re.sub(r"\[\d+\]", "", dotted)
        while True:
            if key in self.overrides:
                return self.overrides[key]
            if "." not in key:
                return self.default
            key = key.rsplit(".", 1)[0]

    def of_section(self, path: str) -> str:
        """Origin of a whole sub-config, which may mix recipe and CLI values."""
        touched = [k for k in self.overrides if not path or k == path or k.startswith(path + ".")]
        if not touched:
            return self.default
        if len(touched) == 1 and not self.default:
            return self.overrides[touched[0]]
        base = self.default or "defaults"
        return f"{base} with command-line overrides"


def _where(label: str) -> str:
    return f" in {label}" if label else ""


# --------------------------------------------------------------------------
# Building dataclasses from plain data
# --------------------------------------------------------------------------


def from_dict(cls: type, data: Mapping, *, path: str = "", source: str = "") -> Any:
    """Build ``cls`` from a nested mapping, strictly and recursively.

    ``path`` is the dotted prefix of ``data`` within a larger config (used in
    messages); ``source`` names where ``data`` came from, e.g. a yaml file.
    Raises ConfigError for unknown keys, missing required keys, uncoercible
    values and ValueErrors raised by a dataclass's ``__post_init__``.
    """
    return _build(cls, data, path, _Sources(default=source))


def _build(cls: type, data: Any, path: str, sources: _Sources) -> Any:
    if not _is_dataclass_type(cls):
        raise TypeError(f"from_dict needs a dataclass type, got {cls!r}")
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"config section {_display(path)}{_where(sources.of_key(path))} must be a mapping "
            f"of {cls.__name__} fields, got {_show(data)}"
        )
    fields = _init_fields(cls)
    _reject_unknown_keys(data, fields, path, sources)
    _reject_missing_required(data, fields, path, sources)
    hints = typing.get_type_hints(cls)
    kwargs = {
        name: _coerce(_over_field_default(fields[name], value), hints[name], _join(path, name), sources)
        for name, value in data.items()
    }
    return _construct(cls, kwargs, path, sources)


def _over_field_default(f: dataclasses.Field, value: Any) -> Any:
    """A section given as a mapping overrides the *field's* default, not its class's: a root config may
    default a section differently (fine-tuning's ``train_augment`` is a ``finetune`` pipeline, ``eval_augment``
    an ``eval`` one), and a recipe that sets one key of it keeps the rest of that default."""
    if not isinstance(value, Mapping) or f.default_factory is dataclasses.MISSING:
        return value
    default = f.default_factory()
    if not dataclasses.is_dataclass(default):
        return value
    merged = _to_plain(default, f.name)
    _deep_merge(merged, value)
    return merged


def _init_fields(cls: type) -> dict[str, dataclasses.Field]:
    """Fields the constructor accepts, in declaration order (= valid keys)."""
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _reject_unknown_keys(
    data: Mapping, fields: Mapping[str, dataclasses.Field], path: str, sources: _Sources
) -> None:
    for key in data:
        if key in fields:
            continue
        dotted = _join(path, str(key))
        close = difflib.get_close_matches(str(key), list(fields), n=1)
        hint = f" (did you mean '{_join(path, close[0])}'?)" if close else ""
        level = f"under '{path}'" if path else "at top level"
        raise ConfigError(
            f"unknown config key '{dotted}'{_where(sources.of_key(dotted))}{hint}; "
            f"valid keys {level}: {', '.join(fields)}"
        )


def _reject_missing_required(
    data: Mapping, fields: Mapping[str, dataclasses.Field], path: str, sources: _Sources
) -> None:
    for name, f in fields.items():
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        if name not in data and not has_default:
            raise ConfigError(
                f"missing required config key '{_join(path, name)}'{_where(sources.of_section(path))}"
            )


def _construct(cls: type, kwargs: dict, path: str, sources: _Sources) -> Any:
    """Call the constructor so __post_init__ runs; prefix its errors with the path."""
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(
            f"invalid config {_display(path, cls)}{_where(sources.of_section(path))}: {err}"
        ) from err


def _is_dataclass_type(obj: Any) -> bool:
    return isinstance(obj, type) and dataclasses.is_dataclass(obj)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _display(path: str, cls: Optional[type] = None) -> str:
    if path:
        return f"'{path}'"
    return f"(top level {cls.__name__})" if cls is not None else "(top level)"


def _show(value: Any) -> str:
    """Received value plus its type, for error messages."""
    if isinstance(value, Mapping):
        return f"a mapping {dict(value)!r}"
    return f"{value!r} ({type(value).__name__})"


# --------------------------------------------------------------------------
# Coercion by annotation
# --------------------------------------------------------------------------


class _Mismatch(Exception):
    """A value does not fit an annotation; _coerce turns it into a ConfigError."""


def _coerce(value: Any, annotation: Any, key: str, sources: _Sources) -> Any:
    """Convert ``value`` to ``annotation`` or raise a ConfigError naming ``key``."""
    if annotation is Any or annotation is object:
        return value
    if _is_dataclass_type(annotation):
        return _build(annotation, value, key, sources)
    origin = typing.get_origin(annotation)
    if origin is Union or origin is types.UnionType:
        return _coerce_union(value, annotation, key, sources)
    if origin is Literal:
        return _coerce_literal(value, annotation, key, sources)
    if origin in (tuple, list, dict) or annotation in (tuple, list, dict):
        return _coerce_container(value, annotation, key, sources)
    try:
        return _coerce_scalar(value, annotation)
    except _Mismatch as err:
        reason = f" ({err})" if str(err) else ""
        raise ConfigError(
            f"config key '{key}'{_where(sources.of_key(key))}: expected {_type_name(annotation)}, "
            f"got {_show(value)}{reason}"
        ) from None


def _coerce_scalar(value: Any, annotation: Any) -> Any:
    if isinstance(value, Mapping):
        raise _Mismatch("a scalar field cannot be set to a mapping")
    coercer = _SCALAR_COERCERS.get(annotation)
    if coercer is not None:
        return coercer(value)
    if isinstance(annotation, type) and isinstance(value, annotation):
        return value
    raise _Mismatch(f"annotation {_type_name(annotation)} is not supported by the config loader")


def _to_int(value: Any) -> int:
    # bool is an int subclass, but `micro_batch: true` is always a mistake.
    if isinstance(value, bool):
        raise _Mismatch()
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        return _int_from_text(value)
    raise _Mismatch()


def _int_from_text(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        pass
    # '1e3' reaches us as a string (see _to_float); accept it when it is integral.
    try:
        number = float(text)
    except ValueError:
        raise _Mismatch() from None
    if not number.is_integer():
        raise _Mismatch()
    return int(number)


def _to_float(value: Any) -> float:
    if isinstance(value, bool):
        raise _Mismatch()
    if isinstance(value, (int, float)):
        return float(value)
    # PyYAML follows YAML 1.1, which reads `1e-3` (no dot) as the string '1e-3'.
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            raise _Mismatch() from None
    raise _Mismatch()


def _to_bool(value: Any) -> bool:
    # Only real booleans (yaml true/false/yes/no/on/off) and the words true/false;
    # 0/1/2 are rejected because a typo there should not become a silent flag.
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise _Mismatch()


def _to_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    # `run.name=123` arrives as int 123 after yaml parsing; the user meant text.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    # true/yes/on would be rendered back ambiguously; ask for quotes instead.
    raise _Mismatch("quote the value to pass it as text")


_SCALAR_COERCERS = {int: _to_int, float: _to_float, bool: _to_bool, str: _to_str}


def _coerce_union(value: Any, annotation: Any, key: str, sources: _Sources) -> Any:
    members = typing.get_args(annotation)
    if value is None:
        if type(None) in members:
            return None
        raise ConfigError(
            f"config key '{key}'{_where(sources.of_key(key))}: expected {_type_name(annotation)}, got None"
        )
    candidates = [m for m in members if m is not type(None)]
    # Keep a value whose type already is a member (Union[int, str] with 'a' stays 'a').
    for member in candidates:
        if isinstance(member, type) and type(value) is member:
            return value
    for member in candidates:
        try:
            return _coerce(value, member, key, sources)
        except ConfigError as err:
            last_error = err
    # Optional[Section] or Optional[list[...]]: the inner error is the precise one.
    if len(candidates) == 1 and candidates[0] not in _SCALAR_COERCERS:
        raise last_error
    raise ConfigError(
        f"config key '{key}'{_where(sources.of_key(key))}: expected {_type_name(annotation)}, "
        f"got {_show(value)}"
    )


def _coerce_literal(value: Any, annotation: Any, key: str, sources: _Sources) -> Any:
    allowed = typing.get_args(annotation)
    for option in allowed:
        # Coerce to each option's own type so `--x=8` matches Literal['8'] and vice versa.
        try:
            candidate = _coerce_scalar(value, type(option))
        except _Mismatch:
            continue
        if candidate == option:
            return option
    raise ConfigError(
        f"config key '{key}'{_where(sources.of_key(key))}: expected one of "
        f"{', '.join(repr(a) for a in allowed)}, got {_show(value)}"
    )


def _coerce_container(value: Any, annotation: Any, key: str, sources: _Sources) -> Any:
    origin = typing.get_origin(annotation) or annotation
    args = typing.get_args(annotation)
    if origin is dict:
        return _coerce_dict(value, annotation, args, key, sources)
    # A string is a Sequence too, but `betas: 0.9,0.95` is a typo, not a tuple of chars.
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise ConfigError(
            f"config key '{key}'{_where(sources.of_key(key))}: expected {_type_name(annotation)} "
            f"(a yaml list such as [1, 2]), got {_show(value)}"
        )
    item_types = _item_types(origin, args, len(value), annotation, key, sources)
    items = [
        _coerce(item, item_type, f"{key}[{i}]", sources)
        for i, (item, item_type) in enumerate(zip(value, item_types))
    ]
    return tuple(items) if origin is tuple else items


def _item_types(
    origin: type, args: tuple, length: int, annotation: Any, key: str, sources: _Sources
) -> list:
    """Annotation of each item: homogeneous list/tuple[X, ...], or fixed tuple[X, Y]."""
    if not args:
        return [Any] * length
    if origin is list or (len(args) == 2 and args[1] is Ellipsis):
        return [args[0]] * length
    if len(args) != length:
        raise ConfigError(
            f"config key '{key}'{_where(sources.of_key(key))}: expected {_type_name(annotation)} "
            f"with exactly {len(args)} items, got {length}"
        )
    return list(args)


def _coerce_dict(value: Any, annotation: Any, args: tuple, key: str, sources: _Sources) -> dict:
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"config key '{key}'{_where(sources.of_key(key))}: expected {_type_name(annotation)}, "
            f"got {_show(value)}"
        )
    key_type, value_type = args if args else (Any, Any)
    return {
        _coerce(k, key_type, f"{key}.{k}", sources): _coerce(v, value_type, f"{key}.{k}", sources)
        for k, v in value.items()
    }


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


# --------------------------------------------------------------------------
# Overrides, loading, saving
# --------------------------------------------------------------------------


def apply_overrides(data: Mapping, overrides: Sequence[str]) -> dict:
    """Return a copy of ``data`` with each ``a.b.c=value`` override applied.

    ``value`` is parsed with yaml.safe_load (empty means null). A mapping value
    is deep-merged into an existing mapping, so ``optim={lr: 1.0e-3}`` keeps
    the recipe's other optim keys. Keys are not validated here; from_dict does.
    """
    result = _deep_copy(data)
    for override in overrides:
        key, value = _parse_override(override)
        _set_dotted(result, key, value, override)
    return result


def _parse_override(override: str) -> tuple[str, Any]:
    if not isinstance(override, str) or "=" not in override:
        raise ConfigError(
            f"override {override!r} must look like key.subkey=value (missing '=')"
        )
    key, text = override.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {override!r} has an empty key or key segment")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"override {override!r}: value is not valid yaml ({err})") from None
    return key, value


def _set_dotted(data: dict, key: str, value: Any, override: str) -> None:
    *parents, leaf = key.split(".")
    node = data
    for depth, part in enumerate(parents):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            prefix = ".".join(parents[: depth + 1])
            raise ConfigError(
                f"override {override!r}: cannot set '{key}' because '{prefix}' "
                f"is the scalar {child!r}, not a section"
            )
        node = child
    if isinstance(value, Mapping) and isinstance(node.get(leaf), dict):
        _deep_merge(node[leaf], value)
    else:
        node[leaf] = _deep_copy(value)


def _deep_merge(target: dict, updates: Mapping) -> None:
    for k, v in updates.items():
        if isinstance(v, Mapping) and isinstance(target.get(k), dict):
            _deep_merge(target[k], v)
        else:
            target[k] = _deep_copy(v)


def _deep_copy(value: Any) -> Any:
    """Copy the dict/list skeleton; leaves are immutable yaml scalars."""
    if isinstance(value, Mapping):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


def load_config(cls: type, yaml_path: Optional[str], overrides: Sequence[str] = ()) -> Any:
    """Defaults of ``cls``, updated by the yaml recipe, updated by CLI overrides."""
    data = _read_yaml_mapping(yaml_path) if yaml_path else {}
    merged = apply_overrides(data, overrides)
    sources = _Sources(default=str(yaml_path or ""), overrides=_override_labels(overrides))
    return _build(cls, merged, "", sources)


def _read_yaml_mapping(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid yaml: {err}") from None
    if data is None:  # an empty recipe means "all defaults"
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"top level of {path} must be a mapping of config keys, got {_show(data)}")
    return data


def _override_labels(overrides: Sequence[str]) -> dict[str, str]:
    # Later overrides of the same key win, in messages as in values.
    return {o.split("=", 1)[0].strip(): f"command-line override '{o}'" for o in overrides}


def to_dict(cfg: Any) -> dict:
    """Plain dict/list/str/int/float/bool/None tree of a dataclass instance.

    Tuples become lists so the result survives yaml.safe_dump; from_dict turns
    them back into tuples, so from_dict(type(cfg), to_dict(cfg)) == cfg.
    """
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError(f"to_dict needs a dataclass instance, got {cfg!r}")
    return _to_plain(cfg, "")


def _to_plain(value: Any, path: str) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: _to_plain(getattr(value, f.name), _join(path, f.name))
            for f in dataclasses.fields(value)
            if f.init
        }
    if isinstance(value, Mapping):
        return {k: _to_plain(v, f"{path}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"config value '{path}' of type {type(value).__name__} is not a plain yaml type")


def save_config(cfg: Any, out_dir: str, derived: Union[Mapping, Derived, None] = None) -> list[str]:
    """Write ``config.yaml`` (resolved config) and, if given, ``derived.yaml``.

    Each file is written to a temp file in ``out_dir`` and moved into place
    with os.replace, so a crash never leaves a half-written file. Call it on
    rank 0 only. Returns the written paths.
    """
    os.makedirs(out_dir, exist_ok=True)
    written = [_atomic_write_yaml(os.path.join(out_dir, "config.yaml"), to_dict(cfg))]
    if derived is not None:
        derived_data = to_dict(derived) if dataclasses.is_dataclass(derived) else _to_plain(derived, "")
        written.append(_atomic_write_yaml(os.path.join(out_dir, "derived.yaml"), derived_data))
    return written


def _atomic_write_yaml(path: str, data: Any) -> str:
    directory, name = os.path.split(path)
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            yaml.safe_dump(data, f, sort_keys=False, default_flow_style=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
    return path


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------

USAGE = "usage: [--config PATH] [key.subkey=value ...] [--flag ...] [--flag=value ...]"


def parse_cli(argv: Optional[Sequence[str]] = None) -> tuple[Optional[str], list[str], dict[str, Any]]:
    """Split argv into (config_path, overrides, flags).

    ``--config PATH`` / ``--config=PATH`` names the recipe; ``key=value`` tokens
    are overrides (kept in order, later wins); ``--some-flag`` gives
    ``flags['some_flag'] = True`` and ``--some-flag=text`` gives the string.
    Anything else is an error with a usage hint.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    config_path: Optional[str] = None
    overrides: list[str] = []
    flags: dict[str, Any] = {}
    i = 0
    while i < len(args):
        token = args[i]
        if token == "--config" or token.startswith("--config="):
            if config_path is not None:
                raise ConfigError(f"--config given more than once; {USAGE}")
            config_path, i = _take_config_path(args, i)
            continue
        if token in ("-h", "--help"):
            flags["help"] = True
        elif token.startswith("--"):
            name, value = _parse_flag(token)
            flags[name] = value
        elif "=" in token and not token.startswith("-"):
            overrides.append(token)
        else:
            raise ConfigError(
                f"unexpected argument {token!r}: overrides must look like key.subkey=value; {USAGE}"
            )
        i += 1
    return config_path, overrides, flags


def _take_config_path(args: list[str], i: int) -> tuple[str, int]:
    """Path after --config (as next token or after '='), and the next index."""
    token = args[i]
    if token.startswith("--config="):
        path, next_i = token.split("=", 1)[1], i + 1
    elif i + 1 < len(args) and not args[i + 1].startswith("-") and "=" not in args[i + 1]:
        path, next_i = args[i + 1], i + 2
    else:
        path, next_i = "", i + 1
    if not path:
        raise ConfigError(f"--config needs a path; {USAGE}")
    return path, next_i


def _parse_flag(token: str) -> tuple[str, Any]:
    body = token[2:]
    name, has_value, value = body.partition("=")
    if not name:
        raise ConfigError(f"malformed flag {token!r}; {USAGE}")
    return name.replace("-", "_"), (value if has_value else True)


def config_from_cli(cls: type, argv: Optional[Sequence[str]] = None) -> tuple[Any, dict[str, Any]]:
    """What an entry point calls: ``(config, flags)`` from ``--config PATH key=value ... --flag``.

    A configuration error ends the process with its message and exit code 2 instead of a traceback:
    it is the user's input that needs fixing, not the code. ``--help`` prints the usage and the valid
    top-level sections.
    """
    try:
        config_path, overrides, flags = parse_cli(argv)
        if flags.get("help"):
            sections = ", ".join(f.name for f in dataclasses.fields(cls))
            print(f"{USAGE}\ntop-level config sections of {cls.__name__}: {sections}")
            raise SystemExit(0)
        return load_config(cls, config_path, overrides), flags
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
