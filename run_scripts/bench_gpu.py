"""GPU benchmarks of ``run_scripts/gpu_check.sh``: speed, MFU and memory, each as ratios measured in the same run.

    python run_scripts/bench_gpu.py --out DIR [--smoke] [--only t1,t3] [--budget-s 270]

Each benchmark runs in a child process of its own (an out-of-memory error or a crash ends that benchmark only,
and its memory is returned to the next), under a share of ``--budget-s``; the figures are merged into
``DIR/gpu_bench.json`` after every benchmark, so what finished survives a cut-off, and a table with the targets is
printed and written to ``DIR/gpu_bench.txt``. ``--smoke`` runs everything at tiny sizes on whatever device there
is (the CPU in the test suite), so that this script cannot rot while no GPU is at hand.

* t1: sparse-encoder efficiency eta = (dense time / sparse time) / FLOP ratio, ViT-B 16x224, 90% tube mask, bf16
  (``bench_sparse_encoder.py`` on the GPU). Target >= 0.9.
* t2: one ViT-B VideoMAE pre-training step (batch 32, bf16 autocast, fused AdamW) of our model against Hugging
  Face ``transformers``' VideoMAEForPreTraining with SDPA attention: same sizes, inputs, masks and optimizer,
  alternating. Target: ours >= 1.6x theirs in steps/s.
* t3: MFU of whole DeepSpeed training steps (zero2_bf16, the recipes' template) for pre-training ViT-B and ViT-L
  and fine-tuning ViT-B; model FLOPs (``forward_flops`` x 3) / 790 TFLOP/s, the bf16 matrix-product rate an
  H200 reaches here, and / the rate measured now by an 8192^3 product. Targets: >= 40% pre-training, >= 50%
  fine-tuning. Where the time goes: a torch.profiler table of the top kernels of the ViT-B pre-training step
  (``DIR/profile.txt``) and the kernel time by kind.
* t5: ViT-L fine-tuning step, bf16: activation memory (what the forward keeps for the backward) with per-block
  checkpointing / without, and peak memory of the whole step with / without. Target: <= 0.2.
* t7: the largest ViT-H 32-frame fine-tuning batch that fits with per-block checkpointing (zero2_bf16): peak
  memory fitted on two small batches, predicted, then verified by a step at that batch; its clips/s. Target: >= 64.
* vimpac: one VIMPAC Large-Half pre-training step (5x32x32 codes, 8 videos of two clips) with its "T,H|W" layers and
  with full attention (``bench_vimpac_layout.py``); VIMPAC's Table 13 measured the first 2.5x faster.
* loader: training clips/s of ``TrainClips`` in a 16-worker DataLoader, decord and PyAV, on the loader benchmark's
  Kinetics-like corpus (``bench_loader.py``), against the clips/s the ViT-B pre-training step of t3 consumes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a file, installed or not

REFERENCE_PEAK = 790e12  # bf16 dense matrix products per second an H200 sustains (8192^3, measured)
TARGETS = {"t1_eta": 0.9, "t2_speedup": 1.6, "t3_mfu_pretrain": 0.40, "t3_mfu_finetune": 0.50,
           "t5_activation_ratio": 0.2, "t7_batch": 64}


@dataclasses.dataclass
class Sizes:
    """What each benchmark runs: the GPU sizes of the issue, or tiny ones for ``--smoke``."""

    frames: int = 16
    size: int = 224
    t1: tuple = ("vit_base", 8, 5)  # arch, batch, timed repeats
    t2: tuple = ("vit_base", 32, 8)  # arch, batch, timed steps per model
    t3: tuple = (("pretrain", "vit_base", 64), ("pretrain", "vit_large", 32), ("finetune", "vit_base", 32))
    steps: int = 6  # timed steps of a t3 run, after `warmup`
    warmup: int = 3
    t5: tuple = ("vit_large", 8)  # arch, batch
    t7: tuple = ("vit_huge", 32, (2, 4), 256)  # arch, frames, probe batches, largest batch verified (~15 s a step)
    loader: tuple = (16, 10.0, 2)  # workers, seconds measured per backend, corpus videos per resolution
    matmul: int = 8192
    probe: tuple = (768, 400, 1024, 32, 10)  # feature width, classes, batch, heads, timed steps per round
    vimpac: tuple = ("vimpac_large_half", 5, 256, 8, 5)  # arch, frames, pixels, videos, timed steps per round


SMOKE = Sizes(frames=4, size=32, t1=("vit_debug", 2, 2), t2=("vit_debug", 2, 2),
              t3=(("pretrain", "vit_debug", 2), ("finetune", "vit_debug", 2)), steps=2, warmup=1,
              t5=("vit_debug", 2), t7=("vit_debug", 4, (1, 2), 8), loader=(2, 2.0, 1), matmul=256,
              probe=(64, 4, 64, 6, 2), vimpac=("vit_debug", 2, 32, 2, 1))

# Share of the budget each benchmark may use (its child is stopped past it), in running order.
SHARES = {"t1": 0.10, "t3": 0.24, "t2": 0.16, "t5": 0.10, "t7": 0.22, "loader": 0.12, "probe": 0.08, "vimpac": 0.06}


# ---- shared pieces --------------------------------------------------------------------------------------------


def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_steps(step: Callable[[], None], steps: int, warmup: int) -> list[float]:
    """Seconds of each of ``steps`` calls after ``warmup`` untimed ones, the device drained around each."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        synchronize()
        start = time.perf_counter()
        step()
        synchronize()
        times.append(time.perf_counter() - start)
    return times


def alternating_medians(steps: dict[str, Callable[[], None]], per_round: int, rounds: int,
                        warmup: int = 1) -> dict[str, float]:
    """Median seconds of each of ``steps`` after ``warmup`` untimed calls of each, timed in ``rounds`` that alternate
    between them (``per_round`` calls of one, then of the next) so that a busy machine slows every one alike."""
    for step in steps.values():
        for _ in range(warmup):  # the first calls allocate
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            times[name] += timed_steps(step, per_round, 0)
    return {name: statistics.median(seconds) for name, seconds in times.items()}


def matmul_rate(n: int) -> float:
    """bf16 FLOP/s of an n^3 matrix product here, the mean of ten after three warm-ups."""
    a = torch.randn(n, n, device=device(), dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device(), dtype=torch.bfloat16)
    seconds = statistics.mean(timed_steps(lambda: a @ b, 10, 3))
    return 2 * n**3 / seconds


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def allocated() -> int:
    return torch.cuda.memory_allocated() if torch.cuda.is_available() else 0


def peak_allocated() -> int:
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0


def vit_config(arch: str, frames: int, size: int, **overrides):
    from models.vit import ViTConfig

    return ViTConfig(arch=arch, num_frames=frames, img_size=size, **overrides)


def pretrain_model(arch: str, sizes: Sizes, frames: Optional[int] = None):
    """Built on the device: initializing ViT-H's 632M parameters on the CPU would take a benchmark's share."""
    from models.videomae import PretrainModelConfig, VideoMAE

    with device():
        return VideoMAE(PretrainModelConfig(encoder=vit_config(arch, frames or sizes.frames, sizes.size)))


def classifier(arch: str, frames: int, size: int, checkpointing: str = "none"):
    from models.vit import ClassifierConfig, build_classifier

    encoder = vit_config(arch, frames, size, drop_path=0.1, checkpointing=checkpointing)
    with device():
        return build_classifier(ClassifierConfig(encoder=encoder, num_classes=400))


def tube_masks(grid, batch: int, generator: torch.Generator) -> torch.Tensor:
    from models.masking import build_mask_generator

    return build_mask_generator(tube_90(), grid)(batch, device(), generator)[0]


def tube_90():
    """VideoMAE's mask of the benchmarks: 90% tube."""
    from models.masking import MaskConfig

    return MaskConfig(kind="tube", ratio=0.9)


def random_clips(batch: int, frames: int, size: int) -> torch.Tensor:
    """Normalized fp32 clips (B, C, T, H, W) on the device, as ``model_input`` makes them."""
    return torch.randn(batch, 3, frames, size, size, device=device())


def deepspeed_engine(model: torch.nn.Module, template: str = "zero2_bf16", layer_decay: Optional[float] = None):
    """Our training engine as the loop builds it (template + batch fields, our AdamW groups), one rank."""
    from engine import ds
    from engine.optim import OptimConfig, build_optimizer

    config = ds.load_template(template)
    config.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1, train_batch_size=1,
                  gradient_clipping=0.0)  # DeepSpeed only counts with these; any batch can go through forward
    optimizer = build_optimizer(model, OptimConfig(lr=1e-4), layer_decay)
    return ds.initialize(model, optimizer, config)


def engine_step_fn(engine, kind: str, batch: int, frames: int, size: int) -> Callable[[], None]:
    """One whole training step (forward, backward, optimizer) of ``kind`` on fixed device inputs."""
    from engine import ds

    video = random_clips(batch, frames, size)
    if kind == "pretrain":
        generator = torch.Generator(device=device()).manual_seed(0)
        grid = engine.module.cfg.encoder.grid
        mask = tube_masks(grid, batch, generator)

        def step():
            loss, _, _ = engine(video, mask)
            ds.engine_step(engine, loss)
    else:
        labels = torch.randint(0, 400, (batch,), device=device())

        def step():
            logits = engine(video)
            ds.engine_step(engine, torch.nn.functional.cross_entropy(logits.float(), labels))
    return step


def train_flops_per_clip(model, kind: str) -> float:
    """Model FLOPs of forward + backward of one clip (3x the forward; recomputation is not counted)."""
    if kind == "pretrain":
        from models.masking import num_visible

        grid = model.cfg.encoder.grid
        return 3 * model.forward_flops(grid, num_visible(tube_90(), grid))
    return 3 * model.forward_flops(model.cfg.grid)


# ---- the benchmarks -------------------------------------------------------------------------------------------


def bench_t1(sizes: Sizes, out: Path) -> dict:
    from run_scripts import bench_sparse_encoder

    arch, batch, repeats = sizes.t1
    args = bench_sparse_encoder.parse_args(["--arch", arch, "--frames", str(sizes.frames), "--size", str(sizes.size),
                                            "--batch", str(batch), "--repeats", str(repeats), "--warmup", "2",
                                            "--device", device().type, "--dtype", "bf16"])
    result = bench_sparse_encoder.bench_encoder(args, torch.Generator().manual_seed(0))
    return {"arch": arch, "batch": batch, **result}


def _hf_videomae(arch: str, sizes: Sizes):
    """transformers' VideoMAEForPreTraining with SDPA attention, sized like our model of ``arch``."""
    from transformers import VideoMAEConfig, VideoMAEForPreTraining

    from models.videomae import DECODER_DIMS
    from models.vit import ARCHS

    dim, depth, heads = ARCHS[arch]
    dec_dim, dec_heads = DECODER_DIMS[arch]
    cfg = VideoMAEConfig(image_size=sizes.size, patch_size=16 if sizes.size >= 64 else 8, num_frames=sizes.frames,
                         tubelet_size=2, hidden_size=dim, num_hidden_layers=depth, num_attention_heads=heads,
                         intermediate_size=4 * dim, decoder_hidden_size=dec_dim, decoder_num_hidden_layers=4,
                         decoder_num_attention_heads=dec_heads, decoder_intermediate_size=4 * dec_dim,
                         norm_pix_loss=True, qkv_bias=True)
    return VideoMAEForPreTraining._from_config(cfg, attn_implementation="sdpa")


def bench_t2(sizes: Sizes, out: Path) -> dict:
    """Both models in the same harness: fp32 weights, bf16 autocast, fused AdamW (on CUDA), same clips and masks."""
    import transformers

    from models.videomae import PretrainModelConfig, VideoMAE

    arch, batch, steps = sizes.t2
    patch = 16 if sizes.size >= 64 else 8
    with device():
        ours = VideoMAE(PretrainModelConfig(encoder=vit_config(arch, sizes.frames, sizes.size, patch_size=patch)))
        theirs = _hf_videomae(arch, sizes)
    ours.to(device()).train()
    theirs.to(device()).train()
    video = random_clips(batch, sizes.frames, sizes.size)
    mask = tube_masks(ours.cfg.encoder.grid, batch, torch.Generator(device=device()).manual_seed(0))
    hf_video = video.transpose(1, 2).contiguous()  # transformers wants (B, T, C, H, W)
    fused = {"fused": True} if device().type == "cuda" else {}

    def stepper(model, forward):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, **fused)

        def step():
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device().type, dtype=torch.bfloat16):
                loss = forward()
            loss.backward()
            optimizer.step()
        return step

    cases = {"ours": stepper(ours, lambda: ours(video, mask)[0]),
             "transformers": stepper(theirs, lambda: theirs(pixel_values=hf_video, bool_masked_pos=mask).loss)}
    times = {name: [] for name in cases}
    for name, step in cases.items():
        timed_steps(step, 0, 3)  # warm-up: kernels chosen, allocator grown
    for _ in range(steps):  # alternating, so anything else on the machine slows both alike
        for name, step in cases.items():
            times[name] += timed_steps(step, 1, 0)
    ours_s, theirs_s = statistics.median(times["ours"]), statistics.median(times["transformers"])
    return {"arch": arch, "batch": batch, "transformers": transformers.__version__, "ours_step_s": ours_s,
            "transformers_step_s": theirs_s, "speedup": theirs_s / ours_s, "target": TARGETS["t2_speedup"],
            "harness": "fp32 weights, bf16 autocast, AdamW" + (" fused" if fused else "")}


def _kernel_kind(name: str) -> str:
    lowered = name.lower()
    for kind, keys in (("attention", ("flash", "fmha", "attention", "efficient")),
                       ("matmul", ("gemm", "cutlass", "sm90", "nvjet", "cublas", "matmul", "addmm", "mm")),
                       ("optimizer", ("adam", "multi_tensor", "foreach")),
                       ("norm", ("layer_norm", "layernorm")),
                       ("copy/cast", ("copy", "cat", "index", "gather", "scatter", "memcpy", "memset")),
                       ("communication", ("nccl", "allreduce", "reduce_scatter"))):
        if any(key in lowered for key in keys):
            return kind
    return "elementwise/other"


def profile_step(step: Callable[[], None], path: Path) -> dict:
    """Top kernels of two steps into ``path``; device time share by kind."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        for _ in range(2):
            step()
        synchronize()
    sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    events = prof.key_averages()
    path.write_text(events.table(sort_by=sort, row_limit=25, max_name_column_width=70) + "\n")
    kinds: dict[str, float] = {}
    for event in events:
        # Device kernels only: on CPU, the operators' own time.
        seconds = (getattr(event, "self_device_time_total", 0) if torch.cuda.is_available()
                   else event.self_cpu_time_total)
        if seconds:
            kinds[_kernel_kind(event.key)] = kinds.get(_kernel_kind(event.key), 0.0) + seconds
    total = sum(kinds.values()) or 1.0
    return {kind: round(value / total, 4) for kind, value in sorted(kinds.items(), key=lambda kv: -kv[1])}


def host_syncs(step: Callable[[], None]) -> Optional[dict]:
    """Where one step makes the host wait for the GPU (CUDA's sync debug mode warns at each): count and places."""
    if not torch.cuda.is_available():
        return None
    import warnings
    from collections import Counter

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    places = Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))
    return {"count": sum(places.values()), "places": dict(places.most_common(10))}


def bench_t3(sizes: Sizes, out: Path) -> dict:
    from engine import dist

    dist.init_distributed(require_group=True)
    measured_peak = matmul_rate(sizes.matmul)
    runs = []
    for kind, arch, batch in sizes.t3:
        free_memory()
        frames, size = sizes.frames, sizes.size
        model = pretrain_model(arch, sizes) if kind == "pretrain" else classifier(arch, frames, size)
        flops = train_flops_per_clip(model, kind)
        engine = deepspeed_engine(model, layer_decay=0.75 if kind == "finetune" else None)
        step = engine_step_fn(engine, kind, batch, frames, size)
        seconds = statistics.median(timed_steps(step, sizes.steps, sizes.warmup))
        clips_per_s = batch / seconds
        run = {"kind": kind, "arch": arch, "batch": batch, "step_s": seconds, "clips_per_s": clips_per_s,
               "tflops_per_s": flops * clips_per_s / 1e12, "mfu": flops * clips_per_s / REFERENCE_PEAK,
               "mfu_of_measured_peak": flops * clips_per_s / measured_peak, "peak_mem_gib": peak_allocated() / 2**30,
               "target": TARGETS[f"t3_mfu_{kind}"]}
        run["host_syncs_per_step"] = host_syncs(step)
        if kind == "pretrain" and arch == sizes.t3[0][1]:
            run["time_by_kernel_kind"] = profile_step(step, out / "profile.txt")
        runs.append(run)
        del engine, model, step
    return {"template": "zero2_bf16", "measured_matmul_tflops": measured_peak / 1e12,
            "reference_peak_tflops": REFERENCE_PEAK / 1e12, "runs": runs}


def _activation_and_peak(model, video, labels) -> tuple[int, int]:
    """(bytes the forward keeps for the backward, peak bytes of forward + backward above the weights)."""
    model.zero_grad(set_to_none=True)
    free_memory()
    before = allocated()
    loss = torch.nn.functional.cross_entropy(model(video).float(), labels)
    kept = allocated() - before
    loss.backward()
    return kept, peak_allocated() - before


def bench_t5(sizes: Sizes, out: Path) -> dict:
    arch, batch = sizes.t5
    video = random_clips(batch, sizes.frames, sizes.size).to(torch.bfloat16)
    labels = torch.randint(0, 400, (batch,), device=device())
    result = {"arch": arch, "batch": batch, "dtype": "bf16"}
    model = classifier(arch, sizes.frames, sizes.size).to(device(), torch.bfloat16).train()
    for mode in ("none", "torch"):
        model.checkpointing = mode
        _activation_and_peak(model, video, labels)  # warm-up: workspaces, allocator
        result[f"{mode}_activation_gib"], result[f"{mode}_peak_gib"] = (
            value / 2**30 for value in _activation_and_peak(model, video, labels))
    if torch.cuda.is_available():
        result["activation_ratio"] = result["torch_activation_gib"] / result["none_activation_gib"]
        result["peak_ratio"] = result["torch_peak_gib"] / result["none_peak_gib"]
    result["target"] = TARGETS["t5_activation_ratio"]
    return result


def bench_t7(sizes: Sizes, out: Path) -> dict:
    from engine import dist

    dist.init_distributed(require_group=True)
    arch, frames, probes, cap = sizes.t7
    model = classifier(arch, frames, sizes.size, checkpointing="torch")
    flops = train_flops_per_clip(model, "finetune")
    engine = deepspeed_engine(model, layer_decay=0.75)
    peaks = {}
    for batch in probes:
        step = engine_step_fn(engine, "finetune", batch, frames, sizes.size)
        step()  # the first step allocates the optimizer state
        free_memory()
        step()
        peaks[batch] = peak_allocated()
        del step
    (b1, p1), (b2, p2) = sorted(peaks.items())
    per_clip = (p2 - p1) / (b2 - b1)
    capacity = torch.cuda.mem_get_info()[1] if torch.cuda.is_available() else 0
    predicted = int((0.95 * capacity - (p1 - per_clip * b1)) // per_clip) if capacity else cap
    batch = max(min(predicted, cap), b2)
    result = {"arch": arch, "frames": frames, "template": "zero2_bf16", "checkpointing": "torch",
              "gib_per_clip": per_clip / 2**30, "fixed_gib": (p1 - per_clip * b1) / 2**30,
              "device_gib": capacity / 2**30, "predicted_batch": predicted, "largest_batch_tried": cap}
    while batch >= b2:
        free_memory()
        try:
            step = engine_step_fn(engine, "finetune", batch, frames, sizes.size)
            seconds = timed_steps(step, 1, 0)[0]
        except torch.OutOfMemoryError:
            del step
            batch = int(batch * 0.9)
            continue
        result.update(batch=batch, step_s=seconds, clips_per_s=batch / seconds,
                      mfu=flops * batch / seconds / REFERENCE_PEAK, peak_mem_gib=peak_allocated() / 2**30)
        break
    result["target"] = TARGETS["t7_batch"]
    return result


def bench_loader(sizes: Sizes, out: Path) -> dict:
    from torch.utils.data import DataLoader

    from run_scripts import bench_loader as corpus_bench

    workers, seconds, videos = sizes.loader
    paths = corpus_bench.ensure_corpus(str(ROOT / "runs" / "bench_loader_corpus"), videos)
    result = {"workers": workers, "videos": len(paths), "clip": f"{corpus_bench.CLIP_LEN}x{corpus_bench.SIZE}^2"}
    for backend in ("decord", "pyav"):
        dataset = corpus_bench.ours(paths * 64, backend, repeats=1)
        dataset.set_epoch(0)
        loader = DataLoader(dataset, batch_size=8, shuffle=True, num_workers=workers,
                            pin_memory=torch.cuda.is_available(), collate_fn=_collate, persistent_workers=False)
        clips, start, started = 0, None, time.perf_counter()
        for batch in loader:
            if start is None:  # the clock starts once the workers delivered their first batch
                start = time.perf_counter()
                continue
            clips += batch.shape[0]
            if time.perf_counter() - start >= seconds:
                break
        elapsed = time.perf_counter() - start
        result[f"{backend}_clips_per_s"] = clips / elapsed
        result[f"{backend}_startup_s"] = start - started
        del loader
    return result


def bench_probe(sizes: Sizes, out: Path) -> dict:
    """A grid of linear probe heads in one pass against one head, on the same cached features (DeepSpeed, SGD)."""
    from run_scripts import bench_probe_grid

    dim, classes, batch, heads, steps = sizes.probe
    return bench_probe_grid.measure(dim, classes, batch, heads, rows=8 * batch, steps=steps, rounds=3)


def _collate(items):
    from datasets.video_dataset import collate_clips

    return collate_clips(items)["video"]


def bench_vimpac(sizes: Sizes, out: Path) -> dict:
    """VIMPAC's "T,H|W" layers against full attention: one pre-training step each, same codes and masks."""
    from run_scripts import bench_vimpac_layout

    arch, frames, size, videos, steps = sizes.vimpac
    return bench_vimpac_layout.measure(arch, frames, size, videos, steps, rounds=2)


BENCHMARKS = {"t1": bench_t1, "t3": bench_t3, "t2": bench_t2, "t5": bench_t5, "t7": bench_t7, "loader": bench_loader,
              "probe": bench_probe, "vimpac": bench_vimpac}


# ---- driver ---------------------------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_bench.json, gpu_bench.txt, "
                                                                  "profile.txt")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, any device (the test suite's CPU run)")
    parser.add_argument("--only", default=",".join(BENCHMARKS), help=f"comma-separated subset of {list(BENCHMARKS)}")
    parser.add_argument("--budget-s", type=float, default=270.0, help="wall-clock budget of all benchmarks")
    parser.add_argument("--child", choices=list(BENCHMARKS), help=argparse.SUPPRESS)  # one benchmark, this process
    args = parser.parse_args(argv)
    unknown = set(args.only.split(",")) - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmark(s) {sorted(unknown)}; choose from {list(BENCHMARKS)}")
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: the full sizes need a GPU; --smoke runs tiny sizes on the CPU")
    return args


def run_child(name: str, args: argparse.Namespace) -> None:
    """One benchmark in this process; its figures (or its error) go to ``out/.NAME.json``."""
    from engine.launch import configure_cuda_math

    sizes = SMOKE if args.smoke else Sizes()
    configure_cuda_math(tf32=True)  # as a training run's launcher sets it
    torch.manual_seed(0)
    part = args.out / f".{name}.json"
    try:
        result = BENCHMARKS[name](sizes, args.out)
    except Exception as err:  # recorded, not raised: the other benchmarks still run
        result = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-4000:]}
    part.write_text(json.dumps(result, indent=2, default=str))


def environment() -> dict:
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0],
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    with contextlib.suppress(ImportError):
        import deepspeed

        env["deepspeed"] = deepspeed.__version__
    return env


def run_all(args: argparse.Namespace) -> dict:
    names = [name for name in BENCHMARKS if name in args.only.split(",")]
    report = {"environment": environment(), "smoke": args.smoke, "results": {}}
    args.out.mkdir(parents=True, exist_ok=True)
    deadline = time.perf_counter() + args.budget_s
    share_left = sum(SHARES[name] for name in names)
    for name in names:
        left = deadline - time.perf_counter()
        allowed = left * SHARES[name] / share_left
        share_left -= SHARES[name]
        started = time.perf_counter()
        command = [sys.executable, str(Path(__file__).resolve()), "--out", str(args.out), "--child", name,
                   *(["--smoke"] if args.smoke else [])]
        print(f"[bench] {name}: up to {allowed:.0f} s", flush=True)
        part = args.out / f".{name}.json"
        part.unlink(missing_ok=True)
        try:
            subprocess.run(command, cwd=ROOT, timeout=max(allowed, 5), check=False)
            result = json.loads(part.read_text()) if part.is_file() else {"error": "the benchmark process died"}
        except subprocess.TimeoutExpired:
            result = {"error": f"stopped after its {allowed:.0f} s share of --budget-s"}
        part.unlink(missing_ok=True)
        result["wall_s"] = round(time.perf_counter() - started, 1)
        report["results"][name] = result
        (args.out / "gpu_bench.json").write_text(json.dumps(report, indent=2))
    loader, t3 = report["results"].get("loader", {}), report["results"].get("t3", {})
    consumed = next((run["clips_per_s"] for run in t3.get("runs", []) if run["kind"] == "pretrain"), None)
    if consumed and "decord_clips_per_s" in loader:
        loader["pretrain_step_consumes_clips_per_s"] = consumed
        for backend in ("decord", "pyav"):
            loader[f"{backend}_over_consumed"] = loader[f"{backend}_clips_per_s"] / consumed
    (args.out / "gpu_bench.json").write_text(json.dumps(report, indent=2))
    return report


def _fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def summary(report: dict) -> str:
    """The figures against their targets, one line each."""
    res = report["results"]
    lines = [f"GPU benchmarks ({report['environment']['device']}, torch {report['environment']['torch']}"
             f"{', smoke sizes' if report['smoke'] else ''})"]

    def line(name, value, target, note=""):
        lines.append(f"  {name:44s} {value:>10s}  target {target:>8s}  {note}")

    for key, result in res.items():
        if "error" in result:
            lines.append(f"  {key}: FAILED - {result['error'].splitlines()[0][:150]}")
    t1, t2, t3, t5, t7, loader, probe, vimpac = (res.get(k, {}) for k in ("t1", "t2", "t3", "t5", "t7", "loader",
                                                                         "probe", "vimpac"))
    if "eta" in t1:
        line(f"T1 sparse encoder eta ({t1['arch']}, b{t1['batch']})", _fmt(t1["eta"]), ">= 0.9",
             f"speedup {t1['speedup']:.2f}x of FLOP ratio {t1['flop_ratio']:.2f}x")
    if "speedup" in t2:
        line(f"T2 pre-training step vs transformers ({t2['arch']}, b{t2['batch']})", _fmt(t2["speedup"]) + "x",
             ">= 1.6x", f"ours {t2['ours_step_s'] * 1e3:.0f} ms, transformers {t2['transformers_step_s'] * 1e3:.0f} ms")
    for run in t3.get("runs", []):
        syncs = run.get("host_syncs_per_step")
        line(f"T3 MFU {run['kind']} {run['arch']} b{run['batch']}", _fmt(100 * run["mfu"], ".1f") + "%",
             f">= {100 * run['target']:.0f}%", f"{run['clips_per_s']:.1f} clips/s, {run['tflops_per_s']:.0f} TFLOP/s, "
             f"peak {run['peak_mem_gib']:.1f} GiB" + (f", {syncs['count']} host syncs/step" if syncs else ""))
        if run.get("time_by_kernel_kind"):
            lines.append("    kernel time: " + ", ".join(f"{kind} {100 * share:.0f}%"
                                                     for kind, share in run["time_by_kernel_kind"].items()))
    if "measured_matmul_tflops" in t3:
        lines.append(f"  (bf16 matmul measured now: {t3['measured_matmul_tflops']:.0f} TFLOP/s; MFU above is of "
                     f"{t3['reference_peak_tflops']:.0f})")
    if "activation_ratio" in t5:
        line(f"T5 activation memory ckpt/none ({t5['arch']}, b{t5['batch']})", _fmt(t5["activation_ratio"], ".3f"),
             "<= 0.2", f"{t5['torch_activation_gib']:.2f} / {t5['none_activation_gib']:.2f} GiB; whole-step peak "
             f"ratio {t5['peak_ratio']:.2f}")
    if "batch" in t7:
        line(f"T7 largest batch {t7['arch']} {t7['frames']}f + ckpt", str(t7["batch"]), ">= 64",
             f"{t7['clips_per_s']:.1f} clips/s, peak {t7['peak_mem_gib']:.0f} GiB, predicted {t7['predicted_batch']}")
    if "decord_clips_per_s" in loader:
        line(f"loader {loader['workers']} workers decord / pyav (clips/s)",
             f"{loader['decord_clips_per_s']:.0f}/{loader['pyav_clips_per_s']:.0f}", "",
             f"the ViT-B pre-training step consumes {_fmt(loader.get('pretrain_step_consumes_clips_per_s'), '.0f')}")
    if "grid_over_one" in probe:
        line(f"probe grid of {probe['heads']} heads / one head (D={probe['dim']}, C={probe['classes']})",
             _fmt(probe["grid_over_one"]) + "x", f"<= {probe['target']:g}x",
             f"{probe['grid_ms']:.1f} vs {probe['one_head_ms']:.1f} ms/step, batch {probe['batch']}")
    if "speedup" in vimpac:
        t, h, w = vimpac["codes"]
        line(f"VIMPAC t,h|w / full attention speed ({vimpac['arch']}, {t}x{h}x{w})", _fmt(vimpac["speedup"]) + "x",
             f"paper {vimpac['paper_speedup']:g}x",
             f"{vimpac['factorized_ms']:.1f} vs {vimpac['full_ms']:.1f} ms/step, {vimpac['videos']} videos")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.child:
        run_child(args.child, args)
        return 0
    report = run_all(args)
    text = summary(report)
    print(text)
    (args.out / "gpu_bench.txt").write_text(text + "\n")
    return 1 if any("error" in result for result in report["results"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
