"""Generate the built-in synthetic video dataset (real H.264 mp4 files + VideoMAE list files).

Run from the repository root (300 clips of 32 x 64^2 take a few seconds on 2 cores):

    .venv/bin/python run_scripts/make_synthetic.py --out data/synthetic
    .venv/bin/python run_scripts/make_synthetic.py --out /tmp/syn --num-videos 40 --num-classes 8 \
        --frames 16 --size 32 --seed 1 --workers 2

If DIR already holds a complete dataset generated with the same parameters it is left as it is (use --force to
rebuild anyway). Classes, layout and list format are documented in ``datasets/synthetic/motion.py``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

# Run as a file from anywhere: make the repository root importable (the project may not be installed).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets.synthetic.motion import (  # noqa: E402  (after the sys.path line)
    CLASS_NAMES,
    SyntheticSpec,
    default_workers,
    ensure_synthetic_dataset,
    make_synthetic_dataset,
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    defaults = SyntheticSpec()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="dataset directory (DIR)")
    parser.add_argument("--num-videos", type=int, default=defaults.num_videos, help="clips in all")
    parser.add_argument("--num-classes", type=int, default=defaults.num_classes,
                        help=f"use the first C of the {len(CLASS_NAMES)} classes: {', '.join(CLASS_NAMES)}")
    parser.add_argument("--frames", type=int, default=defaults.frames, help="frames per clip")
    parser.add_argument("--size", type=int, default=defaults.size, help="frame height = width (even, >= 32, not 48 or 72)")
    parser.add_argument("--fps", type=int, default=defaults.fps, help="frame rate written in the files")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="same seed, same dataset")
    parser.add_argument("--val-fraction", type=float, default=defaults.val_fraction,
                        help="share of each class that goes to val.csv")
    parser.add_argument("--workers", type=int, default=None,
                        help=f"processes rendering and encoding (default: CPUs = {default_workers()})")
    parser.add_argument("--force", action="store_true", help="regenerate even if DIR already matches")
    return parser.parse_args(argv)


def spec_from_args(args: argparse.Namespace) -> SyntheticSpec:
    return SyntheticSpec(num_videos=args.num_videos, num_classes=args.num_classes, frames=args.frames,
                         size=args.size, fps=args.fps, seed=args.seed, val_fraction=args.val_fraction)


def format_summary(summary: dict) -> str:
    """Counts per class and split, then where everything is."""
    spec = summary["spec"]
    per_class = summary["per_class"]
    width = max(len(name) for name in summary["class_names"])
    lines = [f"{'label':>5}  {'class':<{width}}  {'train':>5}  {'val':>5}"]
    for label, name in enumerate(summary["class_names"]):
        lines.append(f"{label:>5}  {name:<{width}}  {per_class['train'][name]:>5}  {per_class['val'][name]:>5}")
    counts = summary["counts"]
    lines.append(f"{'':>5}  {'total':<{width}}  {counts['train']:>5}  {counts['val']:>5}")
    how = (f"generated in {summary['seconds']:.1f} s" if summary["generated"]
           else "already complete with these parameters: nothing to do")
    lines += [
        "",
        f"{spec['num_videos']} clips of {spec['frames']} x {spec['size']}x{spec['size']} at {spec['fps']} fps, "
        f"seed {spec['seed']}: {how}",
        f"videos: {summary['videos_dir']}/<class_name>/<index>.mp4",
        f"lists:  {summary['train_list']}, {summary['val_list']} (paths relative to {summary['out_dir']})",
        f"labels: {summary['labels_file']}",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # The generator reports its progress through logging (a large dataset takes a while); show it on stderr.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        spec = spec_from_args(args)
    except ValueError as error:  # a bad request is the user's error: a message, not a traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.force:
        summary = make_synthetic_dataset(args.out, spec, workers=args.workers)
    else:
        summary = ensure_synthetic_dataset(args.out, spec, workers=args.workers)
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
