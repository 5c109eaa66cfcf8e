"""Submit a training run to Slurm: checks the recipe here, then sbatch's run_scripts/slurm/train.sbatch.

    python run_scripts/submit.py pretrain --config run_scripts/configs/pretrain/videomae_l_k400.yaml \\
        --nodes 8 --gpus-per-node 8 --cpus-per-task 12 --partition gpu --time 72:00:00 [key=value ...]
    python run_scripts/submit.py finetune --config ... model.init=runs/videomae_l_k400/weights.pt --nodes 4 ...
    ... --dry-run        print the sbatch command instead of running it

Everything after the entry point that is not an option below goes to the entry point (``--config``, ``key=value``
overrides). The recipe and overrides are loaded here first, so a wrong key fails now rather than after the job
waited in the queue. The job runs in the current directory (relative paths in the config resolve from it), writes
its log to ``<run.output_dir>/slurm-<job id>.out`` (appended to on every requeue), gets the config's
``run.requeue_signal`` ``--warning`` seconds before its time limit, and requeues itself from a checkpoint.
Prints the job id and the log's path.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a file, installed or not

from engine.config import derive  # noqa: E402
from engine.launch import USER_ERRORS, entry_parser, parse_command_line  # noqa: E402
from engine.preempt import parse_signal  # noqa: E402

TEMPLATE = ROOT / "run_scripts" / "slurm" / "train.sbatch"


def entry_points() -> dict[str, Path]:
    """The scripts in run_scripts/ that define a ``TASK`` (a new entry point is found without being listed here)."""
    def defines_task(path: Path) -> bool:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        return any(isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "TASK" for t in node.targets)
                   for node in tree.body)

    return {path.stem: path for path in sorted((ROOT / "run_scripts").glob("*.py")) if defines_task(path)}


def entry_config(entry: str, entry_args: list[str]):
    """The config the entry point would run with these arguments, checked by the entry point's own parser."""
    spec = importlib.util.spec_from_file_location(f"run_scripts_{entry}", entry_points()[entry])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    parser = entry_parser(module.TASK, module.__doc__, getattr(module, "add_flags", None), prog=f"{entry}.py")
    return parse_command_line(parser, module.TASK.config_class, entry_args)[1]


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("entry", choices=sorted(entry_points()), help="entry point: run_scripts/<entry>.py")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8, help="0 for CPU-only nodes (then set --tasks-per-node)")
    parser.add_argument("--tasks-per-node", type=int, default=None,
                        help="ranks per node; default: --gpus-per-node (one rank per GPU)")
    parser.add_argument("--cpus-per-task", type=int, default=None, help="CPUs per rank (data loading workers)")
    parser.add_argument("--launcher", choices=("srun", "torchrun"), default="srun",
                        help="srun: one Slurm task per rank (default); torchrun: one per node")
    parser.add_argument("--partition", default=None)
    parser.add_argument("--time", default=None, help="time limit, e.g. 72:00:00")
    parser.add_argument("--warning", type=int, default=180,
                        help="seconds before the time limit at which the requeue signal arrives (default 180)")
    parser.add_argument("--job-name", default=None, help="default: the config's run.name")
    parser.add_argument("--sbatch-option", action="append", default=[], metavar="OPTION",
                        help="extra sbatch option, e.g. --sbatch-option=--account=vision (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch command, submit nothing")
    args, entry_args = parser.parse_known_args(argv)
    if args.nodes < 1 or args.gpus_per_node < 0 or (args.tasks_per_node or 1) < 1 or args.warning < 0:
        parser.error("--nodes and --tasks-per-node must be >= 1, --gpus-per-node and --warning >= 0")
    if args.tasks_per_node is None:
        if args.gpus_per_node == 0:
            parser.error("--gpus-per-node 0 needs --tasks-per-node (ranks per node)")
        args.tasks_per_node = args.gpus_per_node
    return args, entry_args


def absolute_config(entry_args: list[str]) -> list[str]:
    """The entry's arguments with ``--config`` made absolute (the job may start from a spool directory)."""
    out, i = [], 0
    while i < len(entry_args):
        arg = entry_args[i]
        if arg == "--config" and i + 1 < len(entry_args):
            out += [arg, str(Path(entry_args[i + 1]).resolve())]
            i += 2
            continue
        if arg.startswith("--config="):
            arg = "--config=" + str(Path(arg.split("=", 1)[1]).resolve())
        out.append(arg)
        i += 1
    return out


def sbatch_command(args, cfg, entry_args: list[str]) -> tuple[list[str], Path]:
    """The sbatch command line, and the log path pattern."""
    out = Path(cfg.run.output_dir).resolve()
    log = out / "slurm-%j.out"
    per_node = 1 if args.launcher == "torchrun" else args.tasks_per_node
    command = ["sbatch", "--parsable", f"--job-name={args.job_name or cfg.run.name}", f"--nodes={args.nodes}",
               f"--ntasks-per-node={per_node}", f"--output={log}"]
    if args.gpus_per_node:
        command.append(f"--gpus-per-node={args.gpus_per_node}")
    if args.cpus_per_task:
        cpus = args.cpus_per_task * (args.tasks_per_node if args.launcher == "torchrun" else 1)
        command.append(f"--cpus-per-task={cpus}")
    if args.partition:
        command.append(f"--partition={args.partition}")
    if args.time:
        command.append(f"--time={args.time}")
    # The warning is a signal the run acts on (this replaces the template's USR1): the requeue signal, else the
    # stop signal (checkpoint, no requeue).
    warning = parse_signal(cfg.run.requeue_signal) or parse_signal(cfg.run.stop_signal)
    if warning is None:
        raise SystemExit("submit.py: run.requeue_signal and run.stop_signal are both empty: the job's time-limit "
                         "warning would kill it; set one of them")
    command.append(f"--signal={warning.name[3:]}@{args.warning}")
    exports = {"REPO": str(ROOT), "PYTHON": sys.executable, "LAUNCHER": args.launcher,
               "NPROC_PER_NODE": str(args.tasks_per_node)}
    bad = [f"{k}={v}" for k, v in exports.items() if "," in v]
    if bad:
        raise SystemExit(f"submit.py: sbatch --export cannot carry a comma: {', '.join(bad)}")
    command.append("--export=ALL," + ",".join(f"{k}={v}" for k, v in exports.items()))
    command += args.sbatch_option
    command += [str(TEMPLATE), args.entry, *entry_args]
    return command, log


def main(argv=None) -> int:
    args, entry_args = parse_args(sys.argv[1:] if argv is None else argv)
    entry_args = absolute_config(entry_args)
    try:
        cfg = entry_config(args.entry, entry_args)
    except USER_ERRORS as err:
        print(f"submit.py: {err}", file=sys.stderr)
        return 2
    world = args.nodes * args.tasks_per_node
    derived = derive(cfg.batch, cfg.optim, world)
    command, log = sbatch_command(args, cfg, entry_args)
    summary = (f"{args.entry} {cfg.run.name}: {args.nodes} node(s) x {args.tasks_per_node} rank(s) = {world} ranks "
               f"({args.launcher}); global batch {derived.global_batch} "
               f"({cfg.batch.micro_batch} x {cfg.batch.grad_accum} accumulation x {world}), peak lr {derived.lr:.3g}")
    if args.dry_run:
        print(summary)
        print(shlex.join(command))
        return 0
    log.parent.mkdir(parents=True, exist_ok=True)  # sbatch does not create the log's directory
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        print(f"submit.py: sbatch failed ({result.returncode}): {result.stderr.strip()}", file=sys.stderr)
        return result.returncode
    job_id = result.stdout.strip().split(";")[0]
    print(summary)
    print(f"submitted job {job_id}")
    print(f"log: {str(log).replace('%j', job_id)}   (tail -f it; 'squeue -j {job_id}'; 'scancel {job_id}')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
