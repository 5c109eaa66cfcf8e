"""Loader throughput per core: our clip pipeline against a VideoMAE-style loader, side by side in one run.

    python run_scripts/bench_loader.py [--corpus DIR] [--videos 3] [--rounds 3] [--items 12] [--json PATH]

The corpus is Kinetics-like: 10 s clips at 30 fps and the encoder's default GOP (250), at 568×320 and 456×256,
with panning detailed texture and noise (≈1.5 Mbit/s, like Kinetics at 320p), written once with PyAV/libx264
into ``--corpus`` and reused. Everything runs in this process, pinned to one core with one torch thread and
one decoder thread: clips/s here is clips per second per core, what one DataLoader worker delivers.

Pipelines (16 frames at stride 4, 224² output, multi-scale crop as in VideoMAE pre-training):

* baseline — VideoMAE-style: decord ``VideoReader`` + ``get_batch`` of one clip, each frame to a PIL image,
  PIL crop + bilinear resize, float32 ``/255`` and mean/std normalization → float32 (C, T, 224, 224);
* ours ×r — ``datasets.video_dataset.TrainClips`` with ``repeats=r``: the union of r clips' frames decoded
  once, uint8 crops and resizes on tensors → uint8 (r, C, T, 224, 224); with the decord and PyAV backends.

Rounds alternate the pipelines so a busy machine slows all of them alike; the median round is reported, and
the ratio is clips/s of ours over clips/s of the baseline. Targets: ≥ 3.5× with ×4, ≥ 1.5× with ×1.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file, installed or not

from datasets.annotations import VideoRecord  # noqa: E402
from datasets.sampling import dense_indices  # noqa: E402
from datasets.transforms import AugmentConfig, multi_scale_crop_params  # noqa: E402
from datasets.transforms import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from datasets.video_dataset import DataConfig, TrainClips  # noqa: E402
from datasets.video_io import write_video  # noqa: E402

RESOLUTIONS = ((568, 320), (456, 256))
SECONDS, FPS, CLIP_LEN, RATE, SIZE = 10, 30, 16, 4, 224
TARGETS = {4: 3.5, 1: 1.5}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", default="runs/bench_loader_corpus", help="where the generated videos live")
    parser.add_argument("--videos", type=int, default=3, help="videos per resolution")
    parser.add_argument("--rounds", type=int, default=3, help="alternating measurement rounds")
    parser.add_argument("--items", type=int, default=12, help="decoded videos per pipeline per round")
    parser.add_argument("--cpu", type=int, default=0, help="the core to pin to")
    parser.add_argument("--json", help="also write the figures to this file")
    return parser.parse_args(argv)


# ---- corpus ---------------------------------------------------------------------------------------------------


def kinetics_like_frames(width: int, height: int, seed: int):
    """Panning blurred-noise texture plus per-frame grain: detailed enough for a realistic bitrate."""
    rng = np.random.default_rng(seed)
    texture = rng.integers(0, 256, (height + 64, width + 64, 3)).astype(np.uint16)
    texture = ((texture + np.roll(texture, 1, 0) + np.roll(texture, 1, 1) + np.roll(texture, 1, (0, 1))) // 4)
    for t in range(SECONDS * FPS):
        dx, dy = int(32 + 30 * np.sin(t / 40)), int(32 + 30 * np.cos(t / 55))
        grain = rng.integers(-6, 7, (height, width, 1))
        yield np.clip(texture[dy : dy + height, dx : dx + width] + grain, 0, 255).astype(np.uint8)


def ensure_corpus(directory: str, videos_per_resolution: int) -> list[str]:
    os.makedirs(directory, exist_ok=True)
    paths = []
    for width, height in RESOLUTIONS:
        for k in range(videos_per_resolution):
            path = os.path.join(directory, f"{width}x{height}_{k}.mp4")
            if not os.path.exists(path):  # write_video renames into place: an existing file is complete
                write_video(path, kinetics_like_frames(width, height, seed=k), fps=FPS)
            paths.append(path)
    return paths


# ---- the VideoMAE-style baseline ------------------------------------------------------------------------------


def baseline_clip(path: str, rng: random.Random) -> torch.Tensor:
    import decord
    from PIL import Image

    reader = decord.VideoReader(path, num_threads=1, ctx=decord.cpu(0))
    frames = reader.get_batch(dense_indices(len(reader), CLIP_LEN, RATE, rng)).asnumpy()
    images = [Image.fromarray(frame).convert("RGB") for frame in frames]
    box = multi_scale_crop_params(images[0].height, images[0].width, SIZE, rng)
    crop = (box.left, box.top, box.left + box.width, box.top + box.height)
    images = [image.crop(crop).resize((SIZE, SIZE), Image.BILINEAR) for image in images]
    video = torch.from_numpy(np.stack([np.asarray(image) for image in images])).permute(3, 0, 1, 2).float() / 255
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1, 1)
    return (video - mean) / std


# ---- measurement ----------------------------------------------------------------------------------------------


def ours(paths: list[str], backend: str, repeats: int) -> TrainClips:
    records = [VideoRecord(path) for path in paths]
    cfg = DataConfig(backend=backend, sampling_rate=RATE, train_augment=AugmentConfig(kind="multi_scale", flip=False))
    return TrainClips(records, cfg, clip_len=CLIP_LEN, size=SIZE, repeats=repeats)


def clips_per_second(pipeline, paths: list[str], items: int, seed: int) -> float:
    rng = random.Random(seed)
    start, clips = time.perf_counter(), 0
    for k in range(items):
        if isinstance(pipeline, TrainClips):
            pipeline.set_epoch(seed)
            clips += pipeline[k % len(paths)]["video"].shape[0]
        else:
            pipeline(paths[k % len(paths)], rng)
            clips += 1
    return clips / (time.perf_counter() - start)


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.sched_setaffinity(0, {args.cpu})
    torch.set_num_threads(1)
    paths = ensure_corpus(args.corpus, args.videos)
    pipelines = {"baseline (VideoMAE-style, decord + PIL, float32)": baseline_clip}
    for backend in ("decord", "pyav"):
        for repeats in (1, 4):
            pipelines[f"ours x{repeats} ({backend}, uint8)"] = ours(paths, backend, repeats)
    for pipeline in pipelines.values():  # warm-up: imports, first opens
        clips_per_second(pipeline, paths, 2, seed=99)

    rounds = {name: [] for name in pipelines}
    for r in range(args.rounds):
        for name, pipeline in pipelines.items():
            rounds[name].append(clips_per_second(pipeline, paths, args.items, seed=r))
    rates = {name: statistics.median(values) for name, values in rounds.items()}
    baseline = next(iter(rates.values()))

    print(f"torch {torch.__version__}, 1 core (cpu {args.cpu}), 1 thread; {len(paths)} videos "
          f"{' and '.join(f'{w}x{h}' for w, h in RESOLUTIONS)}, {SECONDS} s at {FPS} fps, GOP 250; "
          f"{CLIP_LEN} frames at stride {RATE} -> {SIZE}^2; median of {args.rounds} rounds x {args.items} videos")
    print(f"{'pipeline':52s} {'clips/s/core':>12s} {'ratio':>7s}  target")
    for name, rate in rates.items():
        repeats = int(name.split(" x")[1][0]) if name.startswith("ours") else None
        target = f">= {TARGETS[repeats]}x" if repeats else ""
        print(f"{name:52s} {rate:12.2f} {rate / baseline:6.2f}x  {target}")
    result = {"clips_per_second": rates, "ratios": {name: rate / baseline for name, rate in rates.items()}}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
