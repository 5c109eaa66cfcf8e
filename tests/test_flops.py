"""Analytic FLOP counts (models/flops.py, ``forward_flops``) against torch's own FlopCounterMode.

All counts are forward FLOPs at 2 per multiply-add. FlopCounterMode counts the matmuls, linears and
convolutions that actually run, so agreement within 2% means the analytic formulas describe the code
(softmax, LayerNorm, GELU and biases are ignored by both).

CPU SDPA caveat (torch 2.14): on CPU ``F.scaled_dot_product_attention`` dispatches to
``aten._scaled_dot_product_flash_attention_for_cpu``, for which FlopCounterMode has no formula, so it
counts the whole attention as 0 FLOPs (see ``test_attention_matmuls_are_counted``). Models on real CPU
tensors are therefore counted with ``attention='manual'`` (the explicit softmax path, numerically the same
as SDPA — see the equivalence tests at the end). On the meta device SDPA falls back to its math
decomposition (two bmm) and is counted, so meta models keep the default ``'sdpa'``. Meta tensors cannot run
a masked forward (the boolean gather of visible tokens has a data-dependent shape), so masked forwards run
on small real CPU tensors.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from models.flops import block_flops, linear_flops
from models.masking import running_cell_mask, tube_mask
from models.videomae import PretrainModelConfig, VideoMAE
from models.vit import Attention, ClassifierConfig, VisionTransformer, ViTConfig, build_classifier

TOLERANCE = 0.02  # relative agreement required between counted and analytic FLOPs

# vit_debug made wide and long enough that attention (4·N²·D) is a real share of a block: with N = 256
# tokens and D = 96, N / (6·D) ≈ 44% of the linear FLOPs.
DEBUG_WIDE = dict(arch="vit_debug", embed_dim=96, num_heads=4, num_frames=8, img_size=64, patch_size=8)
VIT_S_16x224 = dict(arch="vit_small", num_frames=16, img_size=224)

# Published forward multiply-adds (GMACs, the papers' "GFLOPs") of the dense classifiers at 16×224².
PUBLISHED_GMACS = {"vit_small": 57, "vit_base": 180, "vit_large": 597, "vit_huge": 1192}


def count_flops(fn) -> int:
    """Total FLOPs FlopCounterMode records while ``fn()`` runs."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def assert_close(counted: int, analytic: int, tolerance: float = TOLERANCE) -> None:
    assert counted > 0, "FlopCounterMode counted nothing"
    error = abs(counted - analytic) / counted
    assert error <= tolerance, f"counted {counted:.4e}, analytic {analytic:.4e} ({error:.2%} apart)"


def video(cfg: ViTConfig, batch: int, device: str = "cpu") -> torch.Tensor:
    return torch.randn(batch, cfg.in_chans, cfg.num_frames, cfg.img_size, cfg.img_size, device=device)


def visible_count(mask: torch.Tensor) -> int:
    """Visible tokens per sample of a (B, N) mask (True = hidden); every sample has the same count."""
    counts = (~mask).sum(dim=1)
    assert bool((counts == counts[0]).all())
    return int(counts[0])


# ---- attention itself ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "device, use_sdpa",
    [
        ("cpu", False),
        # Not ("cpu", True): FlopCounterMode has no formula for the CPU flash SDPA kernel
        # (aten._scaled_dot_product_flash_attention_for_cpu) and counts it as zero.
        ("meta", True),
    ],
    ids=["cpu-manual", "meta-sdpa"],
)
def test_attention_matmuls_are_counted(device, use_sdpa):
    """One attention layer: qkv + proj linears plus exactly 4·N²·D for QKᵀ and A·V."""
    batch, tokens, dim = 2, 200, 96
    with torch.device(device):
        attn = Attention(dim, num_heads=4, use_sdpa=use_sdpa)
        x = torch.randn(batch, tokens, dim)
    expected = batch * (linear_flops(tokens, dim, 3 * dim) + linear_flops(tokens, dim, dim) + 4 * tokens**2 * dim)
    assert count_flops(lambda: attn(x)) == expected


def test_block_flops_formula():
    """block_flops is 24·N·D² + 4·N²·D for the standard MLP ratio 4."""
    assert block_flops(1568, 768) == 24 * 1568 * 768**2 + 4 * 1568**2 * 768


# ---- dense classifier ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "device, arch_kwargs, batch",
    [("cpu", DEBUG_WIDE, 2), ("meta", VIT_S_16x224, 2)],
    ids=["debug_wide-cpu", "vit_small-16x224-meta"],
)
def test_classifier_forward_flops(device, arch_kwargs, batch):
    attention = "manual" if device == "cpu" else "sdpa"
    cfg = ViTConfig(**arch_kwargs, attention=attention)
    with torch.device(device):
        model = build_classifier(ClassifierConfig(encoder=cfg, num_classes=400))
        clip = video(cfg, batch, device)
    counted = count_flops(lambda: model(clip))
    assert_close(counted, batch * model.forward_flops(cfg.grid))


@pytest.mark.parametrize("arch", sorted(PUBLISHED_GMACS))
def test_published_gmacs(arch):
    """Dense 16×224² classifiers (400 classes) match the papers' GMACs within 1%, counted and analytic."""
    cfg = ViTConfig(arch=arch, num_frames=16, img_size=224)
    with torch.device("meta"):
        model = build_classifier(ClassifierConfig(encoder=cfg, num_classes=400))
        clip = video(cfg, 1, "meta")
    analytic_gmacs = model.forward_flops(cfg.grid) / 2 / 1e9
    published = PUBLISHED_GMACS[arch]
    assert abs(analytic_gmacs - published) / published <= 0.01, f"{arch}: {analytic_gmacs:.1f} vs {published}"
    assert_close(count_flops(lambda: model(clip)), model.forward_flops(cfg.grid))


# ---- ViT-S at 16×224² under a 90% tube mask: one model, clip and mask for the two tests below --------------


@pytest.fixture(scope="module")
def vit_small_masked():
    """(VideoMAE with a ViT-S encoder, clip (1, 3, 16, 224, 224), 90% tube mask) on real CPU tensors."""
    torch.manual_seed(0)
    cfg = ViTConfig(**VIT_S_16x224, attention="manual")
    return VideoMAE(PretrainModelConfig(encoder=cfg)), video(cfg, 1), tube_mask(1, cfg.grid, 0.9)


# ---- encoder on visible tokens ------------------------------------------------------------------------------


def _encoder_counted_and_analytic(encoder: VisionTransformer, clip: torch.Tensor, mask: torch.Tensor):
    with torch.no_grad():
        counted = count_flops(lambda: encoder(clip, mask))
    return counted, clip.shape[0] * encoder.forward_flops(encoder.cfg.grid, visible_count(mask))


def test_masked_encoder_forward_flops_debug():
    """Patch embedding on every token, blocks on the visible ones only."""
    torch.manual_seed(0)
    cfg = ViTConfig(**DEBUG_WIDE, attention="manual")
    encoder = VisionTransformer(cfg, global_pool="none")
    mask = tube_mask(2, cfg.grid, 0.75)
    assert visible_count(mask) < math.prod(cfg.grid)
    assert_close(*_encoder_counted_and_analytic(encoder, video(cfg, 2), mask))


def test_masked_encoder_forward_flops_vit_small(vit_small_masked):
    model, clip, mask = vit_small_masked
    assert_close(*_encoder_counted_and_analytic(model.encoder, clip, mask))


# ---- whole VideoMAE forward ---------------------------------------------------------------------------------


def _videomae_counted_and_analytic(model: VideoMAE, clip, mask, decoder_mask=None):
    """Encoder + encoder_to_decoder + decoder blocks + decoder head (on the decoded tokens only)."""
    num_decoded = None if decoder_mask is None else visible_count(decoder_mask)
    with torch.no_grad():
        counted = count_flops(lambda: model(clip, mask, decoder_mask))
    analytic = clip.shape[0] * model.forward_flops(model.cfg.encoder.grid, visible_count(mask), num_decoded)
    return counted, analytic


@pytest.mark.parametrize("ratio, decoder_ratio", [(0.75, None), (0.9, 0.5)], ids=["75%", "90%-running_cell"])
def test_videomae_forward_flops_debug(ratio, decoder_ratio):
    torch.manual_seed(0)
    cfg = ViTConfig(**DEBUG_WIDE, attention="manual")
    model = VideoMAE(PretrainModelConfig(encoder=cfg))
    mask = tube_mask(2, cfg.grid, ratio)
    decoder_mask = None if decoder_ratio is None else running_cell_mask(2, cfg.grid, decoder_ratio)
    assert_close(*_videomae_counted_and_analytic(model, video(cfg, 2), mask, decoder_mask))


def test_videomae_forward_flops_vit_small(vit_small_masked):
    assert_close(*_videomae_counted_and_analytic(*vit_small_masked))


# ---- SDPA and manual attention are the same function ----------------------------------------------------------


def _sharpen_(model: torch.nn.Module) -> None:
    """Larger qkv weights and random q/v biases: the default init (std .02) gives almost uniform attention,
    which would hide a wrong scale or softmax axis. With std .1 the largest probability is ~12× uniform."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Attention):
                module.qkv.weight.normal_(std=0.1)
                module.q_bias.normal_(std=0.5)
                module.v_bias.normal_(std=0.5)


def _assert_same_grad(name: str, a: torch.Tensor, b: torch.Tensor, tolerance: float = 1e-5) -> None:
    """Equal to ``tolerance`` relative to the tensor's largest entry (at least 1): a weight gradient sums over
    every token of the batch, so float32 summation order alone moves it by ~1e-7 of its magnitude."""
    scale = max(a.abs().max().item(), 1.0)
    error = (a - b).abs().max().item()
    assert error <= tolerance * scale, f"{name}: gradients differ by {error:.2e} (largest entry {scale:.2e})"


def _assert_grads_equal(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert pa.grad is not None and pb.grad is not None, name
        _assert_same_grad(name, pa.grad, pb.grad)


def test_attention_sdpa_matches_manual():
    torch.manual_seed(0)
    sdpa = Attention(96, num_heads=4, use_sdpa=True)
    _sharpen_(sdpa)
    manual = Attention(96, num_heads=4, use_sdpa=False)
    manual.load_state_dict(sdpa.state_dict())
    x = torch.randn(2, 256, 96)
    x_sdpa, x_manual = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_sdpa, out_manual = sdpa(x_sdpa), manual(x_manual)
    torch.testing.assert_close(out_sdpa, out_manual, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(out_sdpa)
    out_sdpa.backward(grad)
    out_manual.backward(grad)
    _assert_same_grad("input", x_sdpa.grad, x_manual.grad)
    _assert_grads_equal(sdpa, manual)


def test_classifier_sdpa_matches_manual():
    """Whole network, masked forward: same logits to 1e-5 and the same gradients for every parameter."""
    torch.manual_seed(0)
    models = {}
    for attention in ("sdpa", "manual"):
        cfg = ViTConfig(**DEBUG_WIDE, attention=attention)
        models[attention] = build_classifier(ClassifierConfig(encoder=cfg, num_classes=10, head_init_scale=1.0))
    _sharpen_(models["sdpa"])
    models["manual"].load_state_dict(models["sdpa"].state_dict())
    clip = video(models["sdpa"].cfg, 2)
    mask = tube_mask(2, models["sdpa"].cfg.grid, 0.5)
    out = {name: model(clip, mask) for name, model in models.items()}
    torch.testing.assert_close(out["sdpa"], out["manual"], atol=1e-5, rtol=1e-5)
    for logits in out.values():
        logits.square().sum().backward()
    _assert_grads_equal(models["sdpa"], models["manual"])
