"""The whole story on CPU, on the built-in synthetic datasets: pre-train a tiny VideoMAE, fine-tune it, fine-tune
the same classifier from scratch with the same budget, probe the frozen pre-trained encoder and the same encoder
at random initialisation (linear heads and k-NN), train the AVA-style action detector from the same pre-trained
encoder and from scratch, test all six, and print the three tables.

    python run_scripts/transfer_demo.py [--out runs/demo] [--pretrain-epochs N] [--finetune-epochs M]
                                        [--probe-epochs P] [--detect-epochs D] [--nproc K] [--set KEY=VALUE ...]
                                        [--finetune-set KEY=VALUE ...] [--probe-set KEY=VALUE ...]
                                        [--detect-set KEY=VALUE ...]

Each stage is the ordinary entry point (pretrain.py, finetune.py, probe.py, detect.py) in its own process, so
running the command again resumes whatever was interrupted and skips what is complete. The synthetic classes (direction,
rotation, approach/recede, ...) and actions (standing still, moving in four directions, flashing) are defined by
motion, which a single frame does not show: what the pre-training learned about motion is what the comparisons
measure.

Config overrides go to the stages whose configs they fit: --set to pre-training, fine-tuning and probing (they
share the classification data section: data.root, data.synthetic, batch.micro_batch, ...), --finetune-set to the
two fine-tuning stages, --probe-set to the two probing stages, --detect-set to the two detection stages (whose
data section is AVA's: data.root is the synthetic AVA folder, data.synthetic a SyntheticAVASpec).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "run_scripts" / "configs"
PRETRAIN_RECIPE = RECIPES / "pretrain" / "tiny_cpu.yaml"
FINETUNE_RECIPE = RECIPES / "finetune" / "tiny_cpu.yaml"
DETECT_RECIPE = RECIPES / "detect" / "tiny_cpu.yaml"  # the same encoder as the tiny pre-training's
PROBE_RECIPE = RECIPES / "probe" / "tiny_cpu.yaml"
PRETRAINED, SCRATCH, RANDOM = "pre-trained (VideoMAE)", "scratch", "random initialisation"


def stage(script: str, recipe: Path, nproc: int, *overrides: str) -> None:
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    cmd = [*launcher, str(ROOT / "run_scripts" / script), "--config", str(recipe), *overrides]
    print("\n$ " + " ".join(cmd[len(launcher) - 1:] if nproc == 1 else cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def markdown_table(header: list[str], rows: dict[str, list[str]]) -> str:
    """One row per run, named by its initialisation."""
    lines = ["| " + " | ".join(["initialisation", *header]) + " |", "|---" * (len(header) + 1) + "|"]
    lines += ["| " + " | ".join([name, *cells]) + " |" for name, cells in rows.items()]
    return "\n".join(lines)


def classification_table(results: dict[str, dict]) -> str:
    """The test results of each fine-tuning run."""
    rows = {}
    for name, result in results.items():
        model, ema = result["model"], result.get("ema")
        rows[name] = [percent(model["top1"]), percent(model["top5"]), percent(model["mean_class_accuracy"]),
                      percent(ema["top1"]) if ema else "-", f"{model['num_scored']}/{model['num_videos']}"]
    return markdown_table(["top-1", "top-5", "mean class acc", "EMA top-1", "videos scored"], rows)


def detection_table(results: dict[str, dict]) -> str:
    """The test results of each detection run: frame mAP, AP per evaluated action, keyframes scored."""
    actions = list(next(iter(results.values()))["ap"])
    rows = {name: [percent(result["mAP"]), *(percent(result["ap"][action]) for action in actions),
                   f"{result['num_scored']}/{result['num_keyframes']}"] for name, result in results.items()}
    return markdown_table(["mAP", *(f"AP {action}" for action in actions), "keyframes scored"], rows)


def probe_table(results: dict[str, dict]) -> str:
    """Each frozen encoder's linear head and k-NN setting chosen on validation, scored on the test set."""
    rows = {}
    for name, result in results.items():
        linear, knn = result["linear"]["chosen"], result["knn"]["chosen"]
        rows[name] = [percent(linear["test"]["top1"]), percent(linear["test"]["top5"]), linear["name"],
                      percent(knn["test"]["top1"]), knn["name"],
                      f"{linear['test']['num_scored']}/{linear['test']['num_videos']}"]
    return markdown_table(["linear top-1", "linear top-5", "head chosen on val", "k-NN top-1", "k-NN chosen on val",
                           "videos scored"], rows)


def read_results(runs: dict[str, Path], name: str = "test_results.json") -> dict[str, dict]:
    return {run: json.loads((path / name).read_text()) for run, path in runs.items()}


def test_results(runs: dict[str, Path]) -> dict[str, dict]:
    return read_results(runs)


def main(argv=None) -> int:
    paragraphs = __doc__.split("\n\n")
    parser = argparse.ArgumentParser(description=paragraphs[0], epilog=paragraphs[-1])
    parser.add_argument("--out", default="runs/demo", help="folder of the five runs and the summary")
    parser.add_argument("--pretrain-epochs", type=int, default=None, help="default: the pre-training recipe's")
    parser.add_argument("--finetune-epochs", type=int, default=None, help="default: the fine-tuning recipe's")
    parser.add_argument("--probe-epochs", type=int, default=None, help="default: the probing recipe's")
    parser.add_argument("--detect-epochs", type=int, default=None, help="default: the detection recipe's")
    parser.add_argument("--nproc", type=int, default=1, help="processes per stage, every stage (torchrun)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for pre-training, the two fine-tuning and the two probing stages, "
                             "not detection (repeatable), e.g. --set data.root=DIR")
    parser.add_argument("--finetune-set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for the two fine-tuning stages only (repeatable)")
    parser.add_argument("--probe-set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for the two probing stages only (repeatable)")
    parser.add_argument("--detect-set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for the two detection stages only (repeatable), e.g. "
                             "--detect-set data.synthetic.num_videos=24 or --detect-set optim.lr=1e-3")
    args = parser.parse_args(argv)
    out = Path(args.out)
    pretrained_weights = out / "pretrain" / "weights.pt"

    def epochs(value):
        return [f"optim.epochs={value}"] if value else []

    stage("pretrain.py", PRETRAIN_RECIPE, args.nproc, f"run.output_dir={out / 'pretrain'}",
          *epochs(args.pretrain_epochs), *args.set)

    finetune_runs = {PRETRAINED: out / "finetune_pretrained", SCRATCH: out / "finetune_scratch"}
    probe_runs = {PRETRAINED: out / "probe_pretrained", RANDOM: out / "probe_random"}
    detect_runs = {PRETRAINED: out / "detect_pretrained", SCRATCH: out / "detect_scratch"}
    for runs, script, recipe, run_epochs, overrides in (
            (finetune_runs, "finetune.py", FINETUNE_RECIPE, args.finetune_epochs, [*args.set, *args.finetune_set]),
            (probe_runs, "probe.py", PROBE_RECIPE, args.probe_epochs, [*args.set, *args.probe_set]),
            (detect_runs, "detect.py", DETECT_RECIPE, args.detect_epochs, args.detect_set)):
        for name, run_dir in runs.items():
            init = [f"model.init={pretrained_weights}"] if name == PRETRAINED else []
            stage(script, recipe, args.nproc, f"run.output_dir={run_dir}", *init, *epochs(run_epochs), *overrides)

    classification = test_results(finetune_runs)
    views = next(iter(classification.values()))["views"]
    probes = read_results(probe_runs, "probe_results.json")
    text = (f"Synthetic motion classes, test set, {views} per video:\n\n{classification_table(classification)}\n\n"
            f"Frozen encoder, the same test set and views (linear heads and k-NN on cached features, each chosen on "
            f"validation):\n\n{probe_table(probes)}\n\n"
            f"Synthetic AVA action detection, frame mAP at IoU 0.5 on the validation keyframes (%):\n\n"
            f"{detection_table(test_results(detect_runs))}\n")
    (out / "summary.md").write_text(text)
    print("\n" + text + f"\n(written to {out / 'summary.md'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
