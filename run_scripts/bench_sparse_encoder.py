"""Sparse encoder efficiency benchmark: does dropping 90% of the tokens buy ~90% of the time back?

Run from the repository root (CPU; about a minute with the defaults on 2 cores):

    .venv/bin/python run_scripts/bench_sparse_encoder.py
    .venv/bin/python run_scripts/bench_sparse_encoder.py --arch vit_base --batch 1 --repeats 3 --threads 2 \
        --json /tmp/sparse.json

What is measured (forward + backward of ``mean(output)``, median of ``--repeats`` runs after ``--warmup``
untimed ones, each run on its own random clip and mask drawn before any timing starts; the two variants of
each comparison alternate run by run, so a busy machine slows both alike):

* dense  - the pre-training encoder (``global_pool='none'``) on ALL tokens (``mask=None``);
* sparse - the same encoder on the visible tokens of a ``--mask-ratio`` tube mask (VideoMAE's encoder).

What the numbers mean:

* speedup    = dense time / sparse time, measured;
* FLOP ratio = ``forward_flops(grid)`` / ``forward_flops(grid, num_visible)``: the speedup a perfectly
  efficient implementation would get. The sparse encoder embeds only the visible tubelets, so the ratio
  is slightly above 1 / (1 - mask ratio) (attention shrinks quadratically);
* eta        = speedup / FLOP ratio, the efficiency of the sparse path; the target is eta >= 0.8.

A second table times one attention layer (``models.vit.Attention``, forward + backward) over all tokens of
the grid (1568 at 16x224^2, what the VideoMAE decoder attends over) at the ViT-S and ViT-B decoder widths,
fused ``F.scaled_dot_product_attention`` against the explicit softmax, and prints manual / SDPA time.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

# Run as a file from anywhere: make the repository root importable (the project may not be installed).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.masking import tube_mask  # noqa: E402  (after the sys.path line)
from models.videomae import DECODER_DIMS  # noqa: E402
from models.vit import ARCHS, Attention, ViTConfig, VisionTransformer  # noqa: E402

TARGET_ETA = 0.8
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DECODER_ARCHS = ("vit_small", "vit_base")  # whose decoder attention is timed: (192, 3 heads), (384, 6 heads)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="vit_small", choices=sorted(ARCHS), help="encoder size")
    parser.add_argument("--frames", type=int, default=16, help="input frames")
    parser.add_argument("--size", type=int, default=224, help="input height = width")
    parser.add_argument("--batch", type=int, default=2, help="clips per forward")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per measurement (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before the timed ones")
    parser.add_argument("--mask-ratio", type=float, default=0.9, help="tube mask ratio of the sparse encoder")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, clips and masks")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="weights and inputs")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    return parser.parse_args(argv)


# ---- inputs and models --------------------------------------------------------------------------------------


def build_encoder(arch: str, frames: int, size: int) -> VisionTransformer:
    """The pre-training encoder (no pooling, no head) with the default fused SDPA attention."""
    return VisionTransformer(ViTConfig(arch=arch, num_frames=frames, img_size=size), global_pool="none")


def draw_clips(count: int, batch: int, cfg: ViTConfig, generator: torch.Generator, device="cpu",
               dtype=torch.float32) -> list[torch.Tensor]:
    shape = (batch, cfg.in_chans, cfg.num_frames, cfg.img_size, cfg.img_size)
    return [torch.randn(shape, generator=generator).to(device, dtype) for _ in range(count)]


def draw_masks(count: int, batch: int, cfg: ViTConfig, ratio: float, generator: torch.Generator, device="cpu"):
    return [tube_mask(batch, cfg.grid, ratio, "cpu", generator).to(device) for _ in range(count)]


def num_visible(mask: torch.Tensor) -> int:
    """Visible tokens per sample (every sample of a tube mask hides the same number)."""
    return int((~mask[0]).sum())


# ---- timing -------------------------------------------------------------------------------------------------


def fwd_bwd_seconds(module: torch.nn.Module, run: Callable[[object], torch.Tensor], item) -> float:
    """Wall time of one ``run(item).mean().backward()``; gradients are cleared before the clock starts."""
    module.zero_grad(set_to_none=True)
    _drain()
    start = time.perf_counter()
    run(item).float().mean().backward()
    _drain()
    return time.perf_counter() - start


def _drain() -> None:
    """Wait for queued GPU work: CUDA kernels run asynchronously to the clock."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_interleaved(cases: dict, inputs: list, warmup: int) -> dict[str, list[float]]:
    """Times of every case ``name -> (module, run)`` on each input, the cases alternating input by input so
    that load from anything else on the machine hits them alike; the first ``warmup`` inputs are untimed."""
    times = {name: [] for name in cases}
    for i, item in enumerate(inputs):
        for name, (module, run) in cases.items():
            elapsed = fwd_bwd_seconds(module, run, item)
            if i >= warmup:
                times[name].append(elapsed)
    return times


def summarize(times: list[float]) -> dict:
    return {"median": statistics.median(times), "min": min(times), "max": max(times)}


def bench_encoder(args: argparse.Namespace, generator: torch.Generator) -> dict:
    """Dense vs sparse encoder times, and the FLOP ratio they should follow."""
    dtype = DTYPES[args.dtype]
    encoder = build_encoder(args.arch, args.frames, args.size).to(args.device, dtype)
    cfg, runs = encoder.cfg, args.warmup + args.repeats
    clips = draw_clips(runs, args.batch, cfg, generator, args.device, dtype)
    masks = draw_masks(runs, args.batch, cfg, args.mask_ratio, generator, args.device)
    visible = num_visible(masks[0])

    cases = {
        "dense": (encoder, lambda pair: encoder(pair[0])),  # mask=None: every token
        "sparse": (encoder, lambda pair: encoder(*pair)),  # visible tokens only
    }
    times = time_interleaved(cases, list(zip(clips, masks)), args.warmup)
    dense, sparse = summarize(times["dense"]), summarize(times["sparse"])

    dense_flops = encoder.forward_flops(cfg.grid)
    sparse_flops = encoder.forward_flops(cfg.grid, visible)
    speedup, flop_ratio = dense["median"] / sparse["median"], dense_flops / sparse_flops
    return {
        "grid": list(cfg.grid),
        "tokens": math.prod(cfg.grid),
        "visible_tokens": visible,
        "dense_s": dense["median"],
        "sparse_s": sparse["median"],
        "dense_range_s": [dense["min"], dense["max"]],
        "sparse_range_s": [sparse["min"], sparse["max"]],
        "speedup": speedup,
        "dense_gflops_per_clip": dense_flops / 1e9,
        "sparse_gflops_per_clip": sparse_flops / 1e9,
        "flop_ratio": flop_ratio,
        "eta": speedup / flop_ratio,
        "eta_target": TARGET_ETA,
    }


def bench_attention(dim: int, heads: int, tokens: int, args: argparse.Namespace, generator) -> dict:
    """One attention layer over ``tokens`` tokens: fused SDPA vs explicit softmax, same weights and inputs."""
    runs = args.warmup + args.repeats
    dtype = DTYPES[args.dtype]
    inputs = [torch.randn(args.batch, tokens, dim, generator=generator).to(args.device, dtype) for _ in range(runs)]
    sdpa = Attention(dim, heads, use_sdpa=True).to(args.device, dtype)
    manual = Attention(dim, heads, use_sdpa=False).to(args.device, dtype)
    manual.load_state_dict(sdpa.state_dict())
    # A fresh leaf per call, so the input gradient is computed (as inside a network) and never accumulated.
    cases = {name: (layer, lambda x, layer=layer: layer(x.detach().requires_grad_()))
             for name, layer in (("sdpa", sdpa), ("manual", manual))}
    times = time_interleaved(cases, inputs, args.warmup)
    sdpa_s, manual_s = statistics.median(times["sdpa"]), statistics.median(times["manual"])
    return {"dim": dim, "heads": heads, "tokens": tokens, "sdpa_s": sdpa_s, "manual_s": manual_s,
            "manual_over_sdpa": manual_s / sdpa_s}


# ---- report -------------------------------------------------------------------------------------------------


def print_header(args: argparse.Namespace) -> None:
    print(f"torch {torch.__version__}  {args.device} {args.dtype}  threads {torch.get_num_threads()}  "
          f"arch {args.arch}  "
          f"input {args.frames}x{args.size}x{args.size}  batch {args.batch}  mask ratio {args.mask_ratio}  "
          f"median of {args.repeats} (after {args.warmup} warm-up), forward + backward")


def _ms_range(seconds: list[float]) -> str:
    return f"{seconds[0] * 1e3:.0f}-{seconds[1] * 1e3:.0f} ms"


def print_encoder(result: dict, arch: str) -> None:
    eta_ok = "OK" if result["eta"] >= result["eta_target"] else "BELOW TARGET"
    rows = [
        ("dense encoder (all tokens)", f"{result['dense_s'] * 1e3:10.1f} ms",
         f"{result['tokens']} tokens, {result['dense_gflops_per_clip']:.1f} GFLOPs/clip fwd, "
         f"range {_ms_range(result['dense_range_s'])}"),
        ("sparse encoder (visible)", f"{result['sparse_s'] * 1e3:10.1f} ms",
         f"{result['visible_tokens']} tokens, {result['sparse_gflops_per_clip']:.1f} GFLOPs/clip fwd, "
         f"range {_ms_range(result['sparse_range_s'])}"),
        ("measured speedup", f"{result['speedup']:10.2f} x", "dense time / sparse time"),
        ("FLOP ratio", f"{result['flop_ratio']:10.2f} x", "forward_flops dense / sparse"),
        ("eta = speedup / FLOP ratio", f"{result['eta']:10.2f}  ", f"target >= {result['eta_target']}: {eta_ok}"),
    ]
    print(f"\nSparse encoder efficiency ({arch}, grid {tuple(result['grid'])})")
    print(f"  {'':28s} {'value':>13s}   note")
    for name, value, note in rows:
        print(f"  {name:28s} {value:>13s}   {note}")


def print_attention(results: list[dict]) -> None:
    print("\nDecoder attention layer, forward + backward (models.vit.Attention)")
    print(f"  {'width/heads':>11s} {'tokens':>7s} {'SDPA ms':>10s} {'manual ms':>10s} {'manual/SDPA':>12s}")
    for r in results:
        print(f"  {r['dim']:>7d}/{r['heads']:<3d} {r['tokens']:>7d} {r['sdpa_s'] * 1e3:>10.1f} "
              f"{r['manual_s'] * 1e3:>10.1f} {r['manual_over_sdpa']:>11.2f}x")


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    print_header(args)

    encoder = bench_encoder(args, generator)
    print_encoder(encoder, args.arch)

    tokens = encoder["tokens"]
    attention = [bench_attention(*DECODER_DIMS[arch], tokens, args, generator) for arch in DECODER_ARCHS]
    print_attention(attention)

    report = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "encoder": encoder, "decoder_attention": attention}
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"\nwrote {args.json}")
    return report


if __name__ == "__main__":
    main()
