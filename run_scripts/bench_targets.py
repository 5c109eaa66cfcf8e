"""What each pre-training target costs a training step: pixels against HOG and the tokenizer's codes.

    python run_scripts/bench_targets.py [--arch vit_small] [--frames 16] [--size 224] [--batch 2] [--steps 3]

One VideoMAE (90% tube masking), one batch of random clips, the whole step (forward with the targets, backward,
AdamW), for each target kind in turn, rounds alternating so that a busy machine slows all of them alike. HOG is
MaskFeat's (Sobel, 16×16 Gaussian window, 9 bins, 8×8 cells). The tokens come from a tokenizer of the default
``models.tokenizer.TokenizerConfig`` (3 stages of 64/128/256 channels, 1024 codes) run on every frame of the clip
(``target.frames=tubelet``), frozen. MAE-ST measured that its per-frame dVAE made training 1.6× slower; the ratio
printed here is the same measurement for ours.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file, installed or not

import torch  # noqa: E402

from models.masking import MaskConfig, build_mask_generator  # noqa: E402
from models.tokenizer import TokenizerConfig, VQTokenizer  # noqa: E402
from models.videomae import PretrainModelConfig, TargetConfig, VideoMAE  # noqa: E402
from models.vit import ViTConfig  # noqa: E402
from run_scripts.bench_gpu import alternating_medians  # noqa: E402

KINDS = ("pixels", "hog", "tokens")


def build(kind: str, encoder: ViTConfig, device: torch.device) -> tuple[VideoMAE, torch.optim.Optimizer]:
    torch.manual_seed(0)
    tokenizer = VQTokenizer(TokenizerConfig()) if kind == "tokens" else None
    target = TargetConfig(kind=kind, tokenizer="benchmark" if kind == "tokens" else "")
    model = VideoMAE(PretrainModelConfig(encoder, target=target), tokenizer=tokenizer).to(device)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="vit_small")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round and target")
    parser.add_argument("--rounds", type=int, default=2)
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    encoder = ViTConfig(arch=args.arch, num_frames=args.frames, img_size=args.size)
    video = torch.randn(args.batch, 3, args.frames, args.size, args.size, device=device)
    mask, _ = build_mask_generator(MaskConfig(kind="tube", ratio=0.9), encoder.grid)(args.batch, device,
                                                                                   torch.Generator(device=device))
    runs = {kind: build(kind, encoder, device) for kind in KINDS}

    def step(kind: str) -> None:
        model, optimizer = runs[kind]
        optimizer.zero_grad(set_to_none=True)
        loss, _, _ = model(video, mask)
        loss.backward()
        optimizer.step()
        loss.item()

    medians = alternating_medians({kind: functools.partial(step, kind) for kind in KINDS}, args.steps, args.rounds)
    base = medians["pixels"]
    where = "cuda" if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"pre-training step, {args.arch} {args.frames}x{args.size}², batch {args.batch}, 90% tube mask [{where}]:")
    for kind in KINDS:
        median = medians[kind]
        print(f"  {kind:7s} {1000 * median:9.1f} ms  {median / base:5.2f}x pixels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
