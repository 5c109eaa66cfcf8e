"""The whole story on CPU, on the built-in synthetic dataset: pre-train a tiny VideoMAE, fine-tune it, fine-tune
the same classifier from scratch with the same budget, test both, and print the table.

    python run_scripts/transfer_demo.py [--out runs/demo] [--pretrain-epochs N] [--finetune-epochs M]
                                        [--nproc K]

Each stage is the ordinary entry point (pretrain.py, finetune.py) in its own process, so running the command
again resumes whatever was interrupted and skips what is complete. The synthetic classes are defined by motion
(direction, rotation, approach/recede, ...), which a single frame does not show: what the pre-training learned
about motion is what the comparison measures.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN_RECIPE = ROOT / "run_scripts" / "configs" / "pretrain" / "tiny_cpu.yaml"
FINETUNE_RECIPE = ROOT / "run_scripts" / "configs" / "finetune" / "tiny_cpu.yaml"


def stage(script: str, recipe: Path, nproc: int, *overrides: str) -> None:
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    cmd = [*launcher, str(ROOT / "run_scripts" / script), "--config", str(recipe), *overrides]
    print("\n$ " + " ".join(cmd[len(launcher) - 1:] if nproc == 1 else cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def table(rows: dict[str, dict]) -> str:
    """A Markdown table of the test results of each fine-tuning run."""
    lines = ["| initialisation | top-1 | top-5 | mean class acc | EMA top-1 | videos scored |",
             "|---|---|---|---|---|---|"]
    for name, results in rows.items():
        model, ema = results["model"], results.get("ema")
        ema_top1 = f"{100 * ema['top1']:.1f}" if ema else "-"
        lines.append(f"| {name} | {100 * model['top1']:.1f} | {100 * model['top5']:.1f} | "
                     f"{100 * model['mean_class_accuracy']:.1f} | {ema_top1} | "
                     f"{model['num_scored']}/{model['num_videos']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo", help="folder of the three runs and the summary")
    parser.add_argument("--pretrain-epochs", type=int, default=None, help="default: the pre-training recipe's")
    parser.add_argument("--finetune-epochs", type=int, default=None, help="default: the fine-tuning recipe's")
    parser.add_argument("--nproc", type=int, default=1, help="processes per stage (torchrun)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every stage (repeatable), e.g. --set data.root=DIR")
    parser.add_argument("--finetune-set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for the two fine-tuning stages only (repeatable)")
    args = parser.parse_args(argv)
    out = Path(args.out)

    def epochs(value):
        return [f"optim.epochs={value}"] if value else []

    stage("pretrain.py", PRETRAIN_RECIPE, args.nproc, f"run.output_dir={out / 'pretrain'}",
          *epochs(args.pretrain_epochs), *args.set)
    runs = {"pre-trained (VideoMAE)": out / "finetune_pretrained", "scratch": out / "finetune_scratch"}
    stage("finetune.py", FINETUNE_RECIPE, args.nproc, f"run.output_dir={runs['pre-trained (VideoMAE)']}",
          f"model.init={out / 'pretrain' / 'weights.pt'}", *epochs(args.finetune_epochs), *args.set,
          *args.finetune_set)
    stage("finetune.py", FINETUNE_RECIPE, args.nproc, f"run.output_dir={runs['scratch']}",
          *epochs(args.finetune_epochs), *args.set, *args.finetune_set)

    results = {name: json.loads((path / "test_results.json").read_text()) for name, path in runs.items()}
    views = next(iter(results.values()))["views"]
    text = f"Synthetic motion classes, test set, {views} per video:\n\n{table(results)}\n"
    (out / "summary.md").write_text(text)
    print("\n" + text + f"\n(written to {out / 'summary.md'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
