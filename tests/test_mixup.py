"""engine.tasks.finetune: timm Mixup/CutMix on (B, C, T, H, W) clips, same cutmix box on every frame."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy

from engine.tasks.finetune import MixupConfig, build_mixup, classification_loss, soft_target_cross_entropy

B, C, T, H, W, K = 4, 3, 5, 16, 20, 10
SMOOTH = 0.1
OFF = SMOOTH / K
ON = 1.0 - SMOOTH + OFF


def constant_clips():
    # every (clip, frame) plane has its own constant value, identical across channels
    v = torch.arange(B).view(B, 1, 1, 1, 1) * 100.0 + torch.arange(T).view(1, 1, T, 1, 1)
    return v.expand(B, C, T, H, W).contiguous()


def smoothed_one_hot(labels):
    return torch.full((len(labels), K), OFF).scatter_(1, labels.view(-1, 1), ON)


def lam_from_targets(targets, labels):
    # labels are distinct, so targets[i, labels[i]] = lam_i * ON + (1 - lam_i) * OFF
    return (targets[torch.arange(len(labels)), labels] - OFF) / (ON - OFF)


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
def test_cutmix_same_box_on_every_frame_and_area_matches_targets(mode):
    np.random.seed(0)
    mix = build_mixup(MixupConfig(mixup_alpha=0.0, cutmix_alpha=1.0, prob=1.0, mode=mode), K)
    labels = torch.tensor([1, 7, 3, 5])
    nontrivial = 0
    for _ in range(10):
        x = constant_clips()
        src = x.clone()
        out, targets = mix(x, labels)
        assert out.shape == (B, C, T, H, W) and targets.shape == (B, K)
        lam = lam_from_targets(targets, labels)
        for i in range(B):
            j = B - 1 - i
            from_flip = out[i] == src[j]  # (C, T, H, W)
            assert torch.all(from_flip | (out[i] == src[i]))  # each pixel from one of the two clips
            ref = from_flip[0, 0]
            assert torch.equal(from_flip, ref.expand(C, T, H, W))  # same box, every channel/frame
            if ref.any():  # it is a rectangle
                rows, cols = ref.any(1).nonzero().squeeze(1), ref.any(0).nonzero().squeeze(1)
                assert torch.all(ref[rows.min():rows.max() + 1, cols.min():cols.max() + 1])
                nontrivial += 1
            area = ref.float().mean().item()
            assert lam[i].item() == pytest.approx(1.0 - area, abs=1e-6)
        expected = lam.view(-1, 1) * smoothed_one_hot(labels) + (1 - lam.view(-1, 1)) * smoothed_one_hot(labels.flip(0))
        torch.testing.assert_close(targets, expected)
        torch.testing.assert_close(targets.sum(1), torch.ones(B))
    assert nontrivial > 0


def test_mixup_is_global_convex_combination():
    np.random.seed(1)
    mix = build_mixup(MixupConfig(mixup_alpha=0.8, cutmix_alpha=0.0, prob=1.0), K)
    labels = torch.tensor([2, 0, 9, 4])
    for _ in range(5):
        x = torch.randn(B, C, T, H, W)
        src = x.clone()
        out, targets = mix(x, labels)
        lam = lam_from_targets(targets, labels)
        assert torch.allclose(lam, lam[0].expand(B))  # 'batch' mode: one lambda per batch
        lam = lam[0].item()
        assert 0.0 <= lam <= 1.0
        torch.testing.assert_close(out, lam * src + (1 - lam) * src.flip(0), rtol=1e-5, atol=1e-5)
        expected = lam * smoothed_one_hot(labels) + (1 - lam) * smoothed_one_hot(labels.flip(0))
        torch.testing.assert_close(targets, expected)


def test_label_smoothing_when_batch_not_mixed():
    # prob=0: clips untouched, targets are smoothed one-hots (0.1/K on off classes)
    mix = build_mixup(MixupConfig(prob=0.0), K)
    labels = torch.tensor([3, 3, 8, 0])
    x = torch.randn(B, C, T, H, W)
    src = x.clone()
    out, targets = mix(x, labels)
    assert torch.equal(out, src)
    torch.testing.assert_close(targets, smoothed_one_hot(labels))
    assert targets[0, 0].item() == pytest.approx(0.1 / K)
    assert targets[0, 3].item() == pytest.approx(0.9 + 0.1 / K)


def test_config_defaults_and_disabled():
    cfg = MixupConfig()
    assert (cfg.mixup_alpha, cfg.cutmix_alpha, cfg.prob, cfg.switch_prob, cfg.mode, cfg.label_smoothing) == (
        0.8, 1.0, 1.0, 0.5, "batch", 0.1)
    assert cfg.enabled
    assert MixupConfig(mixup_alpha=0.8, cutmix_alpha=0.0).enabled
    off = MixupConfig(mixup_alpha=0.0, cutmix_alpha=0.0)
    assert not off.enabled
    assert build_mixup(off, K) is None
    with pytest.raises(ValueError):
        MixupConfig(mode="frame")


def test_odd_batch_and_bad_shapes_raise():
    mix = build_mixup(MixupConfig(), K)
    with pytest.raises(ValueError, match="micro_batch"):
        mix(torch.randn(3, C, T, H, W), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="B, C, T, H, W"):
        mix(torch.randn(B, C, H, W), torch.arange(B))


def test_classification_loss():
    logits = torch.randn(B, K)
    labels = torch.tensor([1, 7, 3, 5])
    torch.testing.assert_close(classification_loss(logits, labels, 0.1), F.cross_entropy(logits, labels, label_smoothing=0.1))
    torch.testing.assert_close(classification_loss(logits, labels, 0.0), F.cross_entropy(logits, labels))
    soft = torch.softmax(torch.randn(B, K), 1)
    ref = SoftTargetCrossEntropy()(logits, soft)
    torch.testing.assert_close(classification_loss(logits, soft, 0.1), ref)  # smoothing ignored for soft targets
    torch.testing.assert_close(soft_target_cross_entropy(logits, soft), ref)
    # hard labels with smoothing == soft targets of the smoothed one-hot
    torch.testing.assert_close(classification_loss(logits, labels, 0.1),
                               classification_loss(logits, smoothed_one_hot(labels)))


def test_mix_then_loss_backward():
    mix = build_mixup(MixupConfig(), K)
    out, targets = mix(torch.randn(B, C, T, H, W), torch.tensor([0, 1, 2, 3]))
    w = torch.randn(C * T * H * W, K, requires_grad=True)
    loss = classification_loss(out.flatten(1) @ w, targets)
    loss.backward()
    assert torch.isfinite(loss) and w.grad is not None
