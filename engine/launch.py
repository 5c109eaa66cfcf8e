"""One launcher for every entry point: command line → config → distributed set-up → task → derived values → training
→ exit code.

An entry point is a task class and a few lines (see ``run_scripts/pretrain.py``)::

    python run_scripts/<entry>.py --config RECIPE [key.sub=value ...] [--flag ...]

Every entry point accepts ``--config``, ``--show-config [SECTION]`` and ``-h/--help``, plus the flags it declares; the
deepspeed launcher's ``--local_rank`` is accepted and ignored (the rank comes from the environment). Any other
``--flag`` is an error that lists the valid ones; other arguments are overrides. Exit codes: 0 done, 2 the user's
input is wrong (one line says what, no traceback), ``engine.preempt.PREEMPTED_EXIT_CODE`` stopped on a signal after
a complete checkpoint, 1 anything else.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import yaml

from datasets.annotations import AnnotationError
from engine import preempt
from engine.config import ConfigError, derive, load_config, to_dict
from engine.data import prepare_synthetic
from engine.dist import cleanup, init_distributed, setup_logging

log = logging.getLogger("launch")

# Mistakes in what the user gave (recipe, overrides, annotation lists): one line and exit code 2.
USER_ERRORS = (ConfigError, AnnotationError)
USER_ERROR_EXIT_CODE = 2


class EntryParser(argparse.ArgumentParser):
    """argparse whose errors are one line naming the valid flags, with exit code 2."""

    def error(self, message: str):
        self.exit(USER_ERROR_EXIT_CODE, f"{self.prog}: {message}\n")

    def valid_flags(self) -> list[str]:
        return [option for action in self._actions if action.help != argparse.SUPPRESS
                and not isinstance(action, argparse._HelpAction) for option in action.option_strings
                if option.startswith("--")]


def entry_parser(task_cls: type, doc: str, add_flags: Optional[Callable[[argparse.ArgumentParser], None]] = None,
                 prog: Optional[str] = None) -> EntryParser:
    """The parser of an entry point: its description, the common flags and the task's own, and an epilogue listing
    the config sections (``--show-config SECTION`` lists a section's keys, values and meaning)."""
    config_class = task_cls.config_class
    sections = "\n".join(f"  {name:<8} {comment}" for name, comment in field_comments(config_class).items())
    epilog = (f"config sections ({config_class.__name__}):\n{sections}\n\n"
              "Set any key with key.sub=value (later wins; yaml values: 1e-3, [0.9, 0.95], null, {a: 1}).\n"
              "List a section's keys, current values and meaning with --show-config SECTION, e.g. --show-config optim.")
    parser = EntryParser(prog=prog or Path(sys.argv[0]).name, description=doc, epilog=epilog, allow_abbrev=False,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="RECIPE", help="yaml recipe: only what differs from the defaults")
    parser.add_argument("--show-config", nargs="?", const="", metavar="SECTION",
                        help="print the resolved config (or one section: optim, model.encoder, ...) and exit")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # deepspeed launcher
    if add_flags is not None:
        add_flags(parser)
    parser.usage = parser.format_usage().removeprefix("usage: ").strip() + " [key.sub=value ...]"
    return parser


def parse_command_line(parser: EntryParser, config_class: type, argv: Optional[Sequence[str]]) -> tuple[Any, Any]:
    """(flags, config) from ``argv``; an unknown flag or argument ends the process with exit code 2."""
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else list(argv))
    overrides = []
    for token in rest:
        if token.startswith("-"):
            flag = token.split("=", 1)[0]
            close = difflib.get_close_matches(flag, parser.valid_flags(), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            parser.error(f"unknown flag {flag}{hint}; valid flags: {', '.join(parser.valid_flags())}, -h/--help")
        if "=" not in token:
            parser.error(f"unexpected argument {token!r}: overrides look like key.sub=value")
        overrides.append(token)
    return args, load_config(config_class, args.config, overrides)


def show_config(cfg: Any, section: str) -> str:
    """The resolved config, or one dotted section of it, as yaml with each key's comment from its dataclass."""
    node, parts = cfg, [part for part in section.split(".") if part]
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else []
        if part not in names:
            raise ConfigError(f"no config section '{'.'.join(parts[: i + 1])}'; valid there: {', '.join(names)}")
        node = getattr(node, part)
    if not dataclasses.is_dataclass(node):
        return yaml.safe_dump({section: node}).strip()
    comments = field_comments(type(node))
    lines = []
    for name, value in to_dict(node).items():
        text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()
        lines.append(f"{name}: {text}" + (f"  # {comments[name]}" if comments.get(name) else ""))
    return "\n".join(lines)


def field_comments(cls: type) -> dict[str, str]:
    """Field name → the comment that documents it in its dataclass's source (after it, or on the lines above)."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        above: list[str] = []
        for line in inspect.getsource(klass).splitlines()[1:]:
            text = line.strip()
            if text.startswith("#"):
                above.append(text.lstrip("#").strip())
                continue
            name, colon, rest = text.partition(":")
            if colon and name.isidentifier() and line.startswith("    ") and not line.startswith("     "):
                comments[name] = rest.split("#", 1)[1].strip() if "#" in rest else " ".join(above)
            above = []
    return comments


def launch(task_cls: type, argv: Optional[Sequence[str]] = None, *, doc: str = "",
           add_flags: Optional[Callable[[argparse.ArgumentParser], None]] = None,
           instead_of_training: Optional[Callable[[Any, Any, Any], Optional[int]]] = None) -> int:
    """Run the entry point of ``task_cls`` and return its exit code.

    ``add_flags(parser)`` declares the entry point's own flags; ``instead_of_training(cfg, flags, info)`` runs after
    the distributed set-up and returns an exit code to end there (``finetune.py --eval-only``), or None to train.
    """
    parser = entry_parser(task_cls, doc, add_flags)
    try:
        flags, cfg = parse_command_line(parser, task_cls.config_class, argv)
        if flags.show_config is not None:
            print(show_config(cfg, flags.show_config))
            return 0
    except USER_ERRORS as err:
        return user_error(err)
    # Before the slow set-up (data, model, DeepSpeed): a signal that arrives during it is acted on at the first step.
    preempt.install(cfg.run.requeue_signal, cfg.run.stop_signal)
    info = init_distributed()
    setup_logging(info.rank)
    configure_cuda_math(cfg.run.tf32)
    try:
        if instead_of_training is not None:
            code = instead_of_training(cfg, flags, info)
            if code is not None:
                return code
        return _train(task_cls, cfg, info)
    except USER_ERRORS as err:
        return user_error(err)
    finally:
        preempt.uninstall()
        cleanup()


def _train(task_cls: type, cfg: Any, info) -> int:
    from engine.loop import TrainingStopped, train

    try:
        prepare_synthetic(getattr(cfg, "data", None))  # the recipe's set-up: built-in data generated before it is read
        # A task may do long work of its own before training (a probe caches its features) and stop on a signal.
        task = task_cls(cfg)
        task.derived = derive(cfg.batch, cfg.optim, info.world_size, num_train_samples=len(task.train_set),
                              token_grid=task.token_grid())
        log.info("derived: %s", task.derived.as_dict())
        train(task, info)
    except TrainingStopped as err:
        log.log(err.log_level, "%s", err)
        return err.exit_code
    if info.is_main:
        log.info("outputs in %s: %s", cfg.run.output_dir, task.outputs)
    return 0


def add_eval_only_flags(parser: argparse.ArgumentParser, does: str, weights_kind: str) -> None:
    """``--eval-only`` and ``--weights``: the flags of an entry point that can score saved weights instead of
    training. ``does``: what it runs and writes, for the help."""
    parser.add_argument("--eval-only", action="store_true", help=f"{does} instead of training")
    parser.add_argument("--weights", metavar="PATH",
                        help=f"{weights_kind} weights for --eval-only (default: the run's weights.pt)")


def eval_only_weights(cfg: Any, flags: argparse.Namespace) -> Optional[Path]:
    """The weights ``--eval-only`` scores, or None to train. ``--weights`` without ``--eval-only`` and weights that
    are not there are the user's mistakes (exit 2)."""
    if not flags.eval_only:
        if flags.weights:
            raise ConfigError("--weights is for --eval-only; to start training from weights, set model.init=PATH")
        return None
    weights = Path(flags.weights or Path(cfg.run.output_dir) / "weights.pt")
    if not weights.is_file():
        raise ConfigError(f"--eval-only: no weights at {weights}")
    return weights


def configure_cuda_math(tf32: bool) -> None:
    """Whether float32 matrix products and convolutions may run on TF32 tensor cores (no effect off CUDA). cuDNN
    also times its convolution algorithms once per input shape (the patch embedding's shapes never change in a
    run) instead of guessing."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = True


def user_error(err: Exception) -> int:
    print(f"error: {err}", file=sys.stderr)
    return USER_ERROR_EXIT_CODE
