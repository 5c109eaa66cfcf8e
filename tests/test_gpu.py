"""The CUDA paths, on one GPU (``pytest -m gpu``; ``run_scripts/gpu_check.sh`` runs them): DeepSpeed engines over
NCCL in every ZeRO stage and low precision, fp16 loss scaling, checkpoint and resume, the fused attention kernels,
activation checkpointing, torch.compile, fine-tuning with validation, the multi-view test and ``predict.py``, pinned
loading, and the sparse encoder against the CPU. Without a GPU every test here is skipped (tests/conftest.py)."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# cuBLAS picks the same kernels run after run only with a fixed workspace: the exact-resume test needs it, and it
# must be set before the first matrix product.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

from engine.checkpoint import load_latest, save_checkpoint  # noqa: E402
from engine.optim import OptimConfig, build_optimizer  # noqa: E402
from models.masking import MaskConfig, build_mask_generator  # noqa: E402
from models.videomae import DecoderConfig, PretrainModelConfig, VideoMAE  # noqa: E402
from models.vit import Attention, ClassifierConfig, ViTConfig, build_classifier  # noqa: E402

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda")
LOW_PRECISION = [f"zero{stage}_{precision}" for stage in (1, 2, 3) for precision in ("bf16", "fp16")]


def tiny_videomae(seed: int = 0, **encoder) -> VideoMAE:
    torch.manual_seed(seed)
    cfg = ViTConfig(arch="vit_debug", num_frames=4, img_size=32, patch_size=8, **encoder)
    return VideoMAE(PretrainModelConfig(encoder=cfg, decoder=DecoderConfig(depth=1)))


def fixed_batch(model: VideoMAE, batch: int = 4, device=CUDA):
    """A normalized fp32 clip batch and a tube mask, the same on every call."""
    generator = torch.Generator().manual_seed(0)
    video = torch.randn(batch, 3, 4, 32, 32, generator=generator)
    mask, _ = build_mask_generator(MaskConfig(kind="tube", ratio=0.75), model.cfg.encoder.grid)(batch, "cpu", generator)
    return video.to(device), mask.to(device)


def engine_for(ds, model, template: str, lr: float = 5e-3, **template_changes):
    """Our DeepSpeed engine (the loop's optimizer groups, one rank) with ``template``'s blocks updated."""
    config = ds.load_template(template)
    for block, values in template_changes.items():
        config[block] = {**config.get(block, {}), **values}
    config.update(train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=1, train_batch_size=4,
                  gradient_clipping=1.0)
    optimizer = build_optimizer(model, OptimConfig(weight_decay=0.0))
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
    return ds.initialize(model, optimizer, config)


def train(ds, engine, video, mask, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        loss, _, _ = engine(video, mask)
        ds.engine_step(engine, loss)
        losses.append(loss.item())
    return losses


def torch_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer inside DeepSpeed's wrapper."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


# ---- DeepSpeed over NCCL ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("template", LOW_PRECISION)
def test_deepspeed_trains_on_cuda_in_every_zero_stage_and_precision(ds_group, template):
    ds = ds_group
    model = tiny_videomae()
    engine = engine_for(ds, model, template)
    assert engine.device.type == "cuda" and torch.distributed.get_backend() == "nccl"
    assert next(engine.module.parameters()).dtype == ds.input_dtype(engine) != torch.float32
    assert torch_optimizer(engine).defaults.get("fused"), "AdamW should run torch's fused CUDA kernel"
    video, mask = fixed_batch(model)
    losses = train(ds, engine, video, mask, 40)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < 0.8 * losses[0], losses


def test_fp16_loss_scaling_backs_off_after_overflows_and_training_goes_on(ds_group):
    ds = ds_group
    model = tiny_videomae()
    # 2^24 makes the scaled loss overflow fp16 (max 65504): the first steps must be skipped and the scale lowered.
    engine = engine_for(ds, model, "zero2_fp16", fp16={"initial_scale_power": 24, "hysteresis": 1})
    video, mask = fixed_batch(model)
    losses = train(ds, engine, video, mask, 40)
    assert ds.skipped_steps(engine) >= 1
    assert ds.loss_scale(engine) < 2**24
    assert all(torch.isfinite(p).all() for p in engine.module.parameters())
    assert sum(losses[-5:]) / 5 < 0.8 * losses[0], losses


@pytest.mark.parametrize("template", ["zero2_bf16", "zero2_fp32", "zero3_bf16"])
def test_checkpoint_and_resume_on_cuda_continue_the_same_run(ds_group, template, tmp_path):
    """3 steps, checkpoint, 3 steps; against a fresh engine that loads the checkpoint and takes the same 3 steps."""
    ds = ds_group
    exact = template.endswith("fp32")
    # fp32 must be bit-exact: the math attention kernels (the fused ones accumulate with atomics) and no TF32.
    backend = torch.nn.attention.SDPBackend.MATH if exact else torch.nn.attention.SDPBackend.FLASH_ATTENTION
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = not exact and tf32
    try:
        with torch.nn.attention.sdpa_kernel([backend, torch.nn.attention.SDPBackend.MATH]):
            model = tiny_videomae(seed=0)
            video, mask = fixed_batch(model)
            first = engine_for(ds, model, template)
            train(ds, first, video, mask, 3)
            save_checkpoint(first, tmp_path, 3, {"note": "resume test"})
            expected = train(ds, first, video, mask, 3)
            expected_weights = ds.full_parameters(first)

            second = engine_for(ds, tiny_videomae(seed=1), template)
            client, _ = load_latest(second, tmp_path)
            assert client["note"] == "resume test"
            got = train(ds, second, video, mask, 3)
            got_weights = ds.full_parameters(second)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    if exact:
        assert got == expected
        for name, value in expected_weights.items():
            assert torch.equal(got_weights[name], value), name
    else:
        torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=2e-2, atol=2e-3)
        for name, value in expected_weights.items():
            torch.testing.assert_close(got_weights[name], value, rtol=2e-2, atol=2e-3, msg=name)


# ---- kernels and memory -----------------------------------------------------------------------------------------


# (width, heads, tokens): ViT-B encoder at 90% masking, its decoder over every token, ViT-H (head width 80).
ATTENTION_SHAPES = [(768, 12, 160), (384, 6, 1568), (1280, 16, 1568)]


@pytest.mark.parametrize("dim,heads,tokens", ATTENTION_SHAPES)
@pytest.mark.parametrize("dtype,backend", [(torch.bfloat16, "FLASH_ATTENTION"), (torch.float16, "FLASH_ATTENTION"),
                                           (torch.bfloat16, "EFFICIENT_ATTENTION"),
                                           (torch.float32, "EFFICIENT_ATTENTION")])
def test_our_attention_runs_on_the_fused_sdpa_kernels(dim, heads, tokens, dtype, backend):
    """Forced to one backend, SDPA raises when our q/k/v layout or dtype does not suit it; the result must match the
    explicit softmax computed in float32."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fused = Attention(dim, heads).to(CUDA, dtype)
    manual = copy.deepcopy(fused).float()
    manual.use_sdpa = False
    x = torch.randn(2, tokens, dim, device=CUDA, dtype=dtype)
    with sdpa_kernel(getattr(SDPBackend, backend)):
        out = fused(x)
        out.float().square().mean().backward()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        reference = manual(x.float())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), reference, rtol=tolerance, atol=tolerance)


def test_bf16_attention_dispatches_to_a_fused_kernel_by_default():
    """Left to choose, SDPA must pick a fused kernel (flash, memory-efficient or cuDNN's) for our layout: no
    softmax kernel of the unfused math path may run."""
    from torch.profiler import ProfilerActivity, profile

    layer = Attention(768, 12).to(CUDA, torch.bfloat16)
    x = torch.randn(8, 160, 768, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        layer(x).float().sum().backward()
        torch.cuda.synchronize()
    kernels = [event.key.lower() for event in prof.key_averages()]
    assert any(key in name for name in kernels for key in ("flash", "fmha", "cudnn", "efficient")), kernels[:40]
    assert not any("softmax" in name for name in kernels), kernels[:40]


def step_peak_gib(model, video) -> float:
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    model(video).float().sum().backward()
    model.zero_grad(set_to_none=True)
    return (torch.cuda.max_memory_allocated() - before) / 2**30


@pytest.mark.parametrize("mode", ["torch", "fairscale"])
def test_activation_checkpointing_lowers_peak_memory(mode):
    def classifier(checkpointing):
        torch.manual_seed(0)
        encoder = ViTConfig(arch="vit_small", num_frames=8, img_size=112, checkpointing=checkpointing)
        return build_classifier(ClassifierConfig(encoder=encoder, num_classes=10)).to(CUDA, torch.bfloat16)

    video = torch.randn(8, 3, 8, 112, 112, device=CUDA, dtype=torch.bfloat16)
    plain, checkpointed = classifier("none"), classifier(mode)
    step_peak_gib(plain, video), step_peak_gib(checkpointed, video)  # warm-up: workspaces
    assert step_peak_gib(checkpointed, video) < 0.6 * step_peak_gib(plain, video)


def test_torch_compile_on_cuda_gives_the_eager_loss_and_gradients():
    eager = tiny_videomae().to(CUDA)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model)
    video, mask = fixed_batch(eager)
    for model, forward in ((eager, eager), (compiled_model, compiled)):
        loss, _, _ = forward(video, mask)
        loss.backward()
        model.loss = loss.detach()
    torch.testing.assert_close(compiled_model.loss, eager.loss, rtol=1e-3, atol=1e-4)
    for (name, a), (_, b) in zip(eager.named_parameters(), compiled_model.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-2, atol=1e-4, msg=name)


def test_the_sparse_encoder_on_cuda_matches_the_cpu():
    """fp32, TF32 off: the visible-token path (gathers, embedding as a matmul, SDPA) agrees across devices."""
    model = tiny_videomae()
    model.eval()
    video, mask = fixed_batch(model, device="cpu")
    with torch.no_grad():
        cpu_loss, cpu_pred, _ = model(video, mask)
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            model.to(CUDA)
            cuda_loss, cuda_pred, _ = model(video.to(CUDA), mask.to(CUDA))
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.testing.assert_close(cuda_pred.cpu(), cpu_pred, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cuda_loss.cpu(), cpu_loss, rtol=1e-4, atol=1e-5)


# ---- data and whole runs ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from datasets.synthetic.motion import SyntheticSpec, ensure_synthetic_dataset

    root = tmp_path_factory.mktemp("synthetic")
    ensure_synthetic_dataset(root, SyntheticSpec(num_videos=24, frames=16, num_classes=4))
    return root


def test_pinned_loading_copies_the_same_clips_to_the_gpu(data_root):
    from torch.utils.data import DataLoader

    from datasets.synthetic.motion import SyntheticSpec
    from datasets.video_dataset import DataConfig, collate_clips
    from engine.data import train_clips

    data = DataConfig(root=str(data_root), synthetic=SyntheticSpec(num_videos=24, frames=16, num_classes=4),
                      num_classes=4)
    clips = train_clips(data, ViTConfig(arch="vit_debug", num_frames=8, img_size=32, patch_size=8), 1, 0)
    clips.set_epoch(0)
    loader = DataLoader(clips, batch_size=4, num_workers=2, pin_memory=True, collate_fn=collate_clips)
    batch = next(iter(loader))
    assert batch["video"].is_pinned()
    on_gpu = batch["video"].to(CUDA, non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(on_gpu.cpu(), batch["video"])


@pytest.mark.e2e
def test_fine_tuning_validates_tests_and_predicts_on_cuda(data_root, tmp_path):
    out = tmp_path / "finetune"
    command = [sys.executable, str(ROOT / "run_scripts" / "finetune.py"), "--config",
               str(ROOT / "run_scripts" / "configs" / "finetune" / "tiny_cpu.yaml"), f"run.output_dir={out}",
               f"data.root={data_root}", "data.synthetic={num_videos: 24, frames: 16, num_classes: 4}",
               "model.num_classes=4", "data.num_classes=4", "batch.micro_batch=4", "optim.epochs=2",
               "eval.every_epochs=1", "run.log_every=1", "ds.template=zero2_bf16", "batch.num_workers=2"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("mfu" in r for r in records), "MFU is logged on a GPU with a known peak"
    assert [r["epoch"] for r in records if "val_top1" in r] == [1, 2]
    test = json.loads((out / "test_results.json").read_text())
    assert test["model"]["num_scored"] == test["model"]["num_videos"] > 0

    from run_scripts import predict

    video = next(p for p in sorted(Path(data_root).rglob("*.mp4")))
    assert predict.main(["--weights", str(out / "weights.pt"), "--video", str(video), "--topk", "2"]) == 0
