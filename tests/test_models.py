"""The ViT family and VideoMAE: published sizes, shapes, position tables, targets, checkpointing."""

import copy
import math

import numpy as np
import pytest
import torch

from models.pos_embed import (
    PositionEmbedding,
    resample_spatial,
    resample_temporal,
    separable_table,
    sincos_table,
)
from models.videomae import (
    DecoderConfig,
    PretrainModelConfig,
    TargetConfig,
    VideoMAE,
    normalize_patches,
    patchify,
    unpatchify,
)
from models.vit import ClassifierConfig, ViTConfig, build_classifier

from helpers import debug_vit


def fixed_count_mask(batch, num_tokens, num_masked, seed=0):
    """Random mask with the same number of hidden tokens in every sample."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.rand(batch, num_tokens, generator=gen).argsort(dim=1)
    mask = torch.zeros(batch, num_tokens, dtype=torch.bool)
    mask.scatter_(1, order[:, :num_masked], True)
    return mask


# ---- sizes ---------------------------------------------------------------------------------------------------

# Fine-tuning models with a 400-class head: patch embed + blocks + fc_norm + head (VideoMAE's published counts).
PUBLISHED = {"vit_small": 22_033_936, "vit_base": 86_534_800, "vit_large": 304_270_736, "vit_huge": 632_119_440}


@pytest.mark.parametrize("arch", PUBLISHED)
def test_classifier_parameter_count_matches_videomae(arch):
    with torch.device("meta"):
        model = build_classifier(ClassifierConfig(ViTConfig(arch=arch), num_classes=400))
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED[arch]


def test_pretrain_model_builds_every_size_on_meta():
    for arch in PUBLISHED:
        with torch.device("meta"):
            model = VideoMAE(PretrainModelConfig(ViTConfig(arch=arch)))
        encoder = sum(p.numel() for p in model.encoder.parameters())
        # The pre-training encoder is the fine-tuning model less fc_norm and head, plus the final norm.
        dim = model.encoder.embed_dim
        assert encoder == PUBLISHED[arch] - (400 * dim + 400)


# ---- forward shapes ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"pos_embed": "separable", "cls_token": True},
        {"num_frames": 4, "img_size": 48, "tubelet_size": 1, "patch_size": 16},
        {"layer_scale_init": 0.1, "drop_path": 0.1},
    ],
)
def test_classifier_forward_and_backward(overrides):
    pool = "cls" if overrides.get("cls_token") else "mean"
    model = build_classifier(ClassifierConfig(debug_vit(**overrides), num_classes=7, global_pool=pool))
    cfg = model.cfg
    video = torch.randn(2, 3, cfg.num_frames, cfg.img_size, cfg.img_size)
    logits = model(video)
    assert logits.shape == (2, 7)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("frames,size", [(16, 32), (8, 64), (32, 48)])
def test_classifier_accepts_other_frame_counts_and_resolutions(frames, size):
    for pos in ("sincos", "separable"):
        model = build_classifier(ClassifierConfig(debug_vit(pos_embed=pos), num_classes=3)).eval()
        assert model(torch.randn(1, 3, frames, size, size)).shape == (1, 3)


def test_non_square_input_and_bad_divisibility():
    model = build_classifier(ClassifierConfig(debug_vit(), num_classes=3)).eval()
    assert model(torch.randn(1, 3, 8, 32, 48)).shape == (1, 3)
    with pytest.raises(ValueError, match="not divisible"):
        model(torch.randn(1, 3, 7, 32, 32))


def test_cls_pooling_needs_a_cls_token():
    with pytest.raises(ValueError, match="cls_token"):
        build_classifier(ClassifierConfig(debug_vit(), global_pool="cls"))


def test_masked_encoder_keeps_only_visible_tokens():
    model = build_classifier(ClassifierConfig(debug_vit(cls_token=True), global_pool="cls")).eval()
    num_tokens = math.prod(model.cfg.grid)
    mask = fixed_count_mask(2, num_tokens, 40)
    tokens = model.forward_features(torch.randn(2, 3, 8, 32, 32), mask)
    assert tokens.shape == (2, 1 + num_tokens - 40, model.embed_dim)


def test_masked_encoder_equals_encoder_on_gathered_tokens():
    """Dropping tokens before the blocks is the same as running the blocks on the gathered visible tokens."""
    model = build_classifier(ClassifierConfig(debug_vit(), num_classes=0)).eval()
    video = torch.randn(2, 3, 8, 32, 32)
    mask = fixed_count_mask(2, 64, 48)
    embedded = model.patch_embed(video) + model.pos_embed(model.cfg.grid)
    visible = embedded[~mask].reshape(2, 16, -1)
    expected = visible
    for block in model.blocks:
        expected = block(expected)
    torch.testing.assert_close(model.forward_features(video, mask), expected)


# ---- position embeddings -------------------------------------------------------------------------------------


def official_sinusoid(n_position, d_hid):
    """The table as the official VideoMAE code writes it: python/numpy loops, float64 then float32."""
    table = np.array(
        [[pos / np.power(10000, 2 * (j // 2) / d_hid) for j in range(d_hid)] for pos in range(n_position)]
    )
    table[:, 0::2] = np.sin(table[:, 0::2])
    table[:, 1::2] = np.cos(table[:, 1::2])
    return torch.tensor(table, dtype=torch.float32)[None]


@pytest.mark.parametrize("n,d", [(1568, 384), (64, 64), (10, 7)])
def test_sincos_table_matches_official_formula(n, d):
    torch.testing.assert_close(sincos_table(n, d), official_sinusoid(n, d), rtol=0, atol=1e-6)


def test_sincos_table_is_a_non_persistent_buffer():
    model = build_classifier(ClassifierConfig(debug_vit(), num_classes=3))
    assert not any("pos_embed" in key for key in model.state_dict())
    assert any(name == "pos_embed.table" for name, _ in model.named_buffers())


def test_separable_table_is_space_plus_time_t_major():
    pos = PositionEmbedding("separable", (3, 2, 2), 5)
    table = pos((3, 2, 2))[0]
    for t in range(3):
        for s in range(4):
            torch.testing.assert_close(table[t * 4 + s], pos.spatial[0, s] + pos.temporal[0, t])


def test_separable_resampling_to_another_grid():
    pos = PositionEmbedding("separable", (4, 4, 4), 6)
    assert pos((8, 6, 6)).shape == (1, 8 * 36, 6)
    # Resampling to the same size is the identity; the parts are resampled independently.
    torch.testing.assert_close(resample_spatial(pos.spatial, (4, 4)), pos.spatial)
    torch.testing.assert_close(resample_temporal(pos.temporal, 4), pos.temporal)
    # A time-constant temporal table stays constant after resampling; spatial structure is preserved.
    constant = torch.ones(1, 4, 6)
    torch.testing.assert_close(resample_temporal(constant, 9), torch.ones(1, 9, 6))
    big = separable_table(pos.spatial, pos.temporal, (2, 4, 4))
    torch.testing.assert_close(big[:, :16] - big[:, 16:], (big[:, :16] - big[:, 16:])[:, :1].expand(1, 16, 6))


# ---- targets and the pre-training objective ------------------------------------------------------------------


def test_patchify_round_trip_and_layout():
    video = torch.randn(2, 3, 4, 8, 12)
    patches = patchify(video, 2, 4)
    assert patches.shape == (2, 2 * 2 * 3, 2 * 4 * 4, 3)
    # Token 1 is (t=0, h=0, w=1): pixels of columns 4..7 of the first two frames, channel innermost.
    torch.testing.assert_close(patches[0, 1, 0], video[0, :, 0, 0, 4])
    torch.testing.assert_close(unpatchify(patches.flatten(2), (2, 2, 3), 2, 4), video)


def test_per_channel_target_normalization():
    patches = torch.rand(2, 5, 32, 3) * 4 + 1
    target = normalize_patches(patches, "per_channel").reshape(2, 5, 32, 3)
    torch.testing.assert_close(target.mean(dim=2), torch.zeros(2, 5, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(target.std(dim=2, unbiased=True), torch.ones(2, 5, 3), atol=1e-4, rtol=0)


def test_joint_target_normalization():
    patches = torch.rand(2, 5, 32, 3)
    target = normalize_patches(patches, "joint")
    assert target.shape == (2, 5, 96)
    torch.testing.assert_close(target.mean(dim=-1), torch.zeros(2, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(target.var(dim=-1), torch.ones(2, 5), atol=1e-4, rtol=0)


def make_pretrain(**target):
    cfg = PretrainModelConfig(debug_vit(), DecoderConfig(depth=2), TargetConfig(**target))
    return VideoMAE(cfg)


def test_pretrain_forward_returns_loss_pred_mask():
    model = make_pretrain()
    video, mask = torch.randn(2, 3, 8, 32, 32), fixed_count_mask(2, 64, 48)
    loss, pred, returned = model(video, mask)
    assert loss.ndim == 0 and loss.dtype == torch.float32
    assert pred.shape == (2, 48, 2 * 8 * 8 * 3)
    assert returned is mask
    loss.backward()
    assert model.mask_token.grad is not None and model.encoder.blocks[0].attn.qkv.weight.grad is not None


def test_loss_is_mse_against_targets_of_the_hidden_tokens():
    model = make_pretrain(normalize="none").eval()
    video, mask = torch.randn(2, 3, 8, 32, 32), fixed_count_mask(2, 64, 48)
    loss, pred, _ = model(video, mask)
    raw = model.pixels(video)
    target = patchify(raw, 2, 8).flatten(2)[mask].reshape(2, 48, -1)
    torch.testing.assert_close(loss, ((pred - target) ** 2).mean())


def test_one_time_slice_targets_use_the_first_frame_of_each_tubelet():
    model = make_pretrain(frames="first", normalize="none").eval()
    video, mask = torch.randn(1, 3, 8, 32, 32), fixed_count_mask(1, 64, 48)
    loss, pred, _ = model(video, mask)
    assert pred.shape == (1, 48, 8 * 8 * 3)
    raw = model.pixels(video)
    target = patchify(raw[:, :, ::2], 1, 8).flatten(2)[mask].reshape(1, 48, -1)
    torch.testing.assert_close(loss, ((pred - target) ** 2).mean())


def test_decoder_mask_that_keeps_exactly_the_hidden_tokens_is_plain_videomae():
    model = make_pretrain().eval()
    video, mask = torch.randn(2, 3, 8, 32, 32), fixed_count_mask(2, 64, 48)
    plain = model(video, mask)
    dual = model(video, mask, decoder_mask=~mask)
    torch.testing.assert_close(plain[0], dual[0])
    torch.testing.assert_close(plain[1], dual[1])


def test_decoder_mask_scores_only_hidden_and_kept_tokens():
    model = make_pretrain().eval()
    video, mask = torch.randn(2, 3, 8, 32, 32), fixed_count_mask(2, 64, 48)
    decoder_mask = fixed_count_mask(2, 64, 32, seed=1)  # decoder keeps 32 tokens, hidden or not
    loss, pred, _ = model(video, mask, decoder_mask)
    assert pred.shape[1] == 32
    kept = ~decoder_mask
    target = model.targets(video)[kept].reshape(2, 32, -1)
    scored = mask[kept].reshape(2, 32)
    per_token = ((pred - target) ** 2).mean(dim=-1)
    torch.testing.assert_close(loss, per_token[scored].mean())


def test_pretrain_with_cls_token_and_separable_tables():
    cfg = PretrainModelConfig(debug_vit(pos_embed="separable", cls_token=True), DecoderConfig(pos_embed="separable"))
    model = VideoMAE(cfg)
    loss, pred, _ = model(torch.randn(2, 3, 8, 32, 32), fixed_count_mask(2, 64, 56))
    assert pred.shape[1] == 56 and torch.isfinite(loss)
    keys = model.state_dict().keys()
    assert {"encoder.pos_embed.spatial", "encoder.cls_token", "decoder_pos_embed.temporal"} <= set(keys)


# ---- activation checkpointing --------------------------------------------------------------------------------


def outputs_and_grads(model, video, mask):
    torch.manual_seed(123)  # drop path draws random numbers: the same stream for every variant
    loss, pred, _ = model(video, mask)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return loss.detach(), pred.detach(), grads


@pytest.mark.parametrize("mode", ["torch", "fairscale", "fairscale_offload"])
def test_checkpointing_gives_identical_outputs_and_gradients(mode):
    cfg = PretrainModelConfig(debug_vit(drop_path=0.2), DecoderConfig(depth=2))
    plain = VideoMAE(cfg).train()
    cfg_ckpt = copy.deepcopy(cfg)
    cfg_ckpt.encoder.checkpointing = mode
    checkpointed = VideoMAE(cfg_ckpt).train()
    checkpointed.load_state_dict(plain.state_dict())

    video, mask = torch.randn(2, 3, 8, 32, 32), fixed_count_mask(2, 64, 48)
    loss_a, pred_a, grads_a = outputs_and_grads(plain, video, mask)
    loss_b, pred_b, grads_b = outputs_and_grads(checkpointed, video, mask)
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=0)
    torch.testing.assert_close(pred_a, pred_b, rtol=0, atol=0)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-6, atol=1e-7, msg=name)


def test_checkpointing_keeps_parameter_names():
    names = set(make_pretrain().state_dict())
    cfg = make_pretrain().cfg
    cfg.encoder.checkpointing = "fairscale"
    assert set(VideoMAE(cfg).state_dict()) == names


# ---- optimizer hooks -----------------------------------------------------------------------------------------


def test_layer_ids_follow_videomae_groups():
    model = build_classifier(ClassifierConfig(debug_vit(pos_embed="separable", cls_token=True), global_pool="cls"))
    depth = model.depth
    assert model.layer_id("patch_embed.proj.weight") == 0
    assert model.layer_id("pos_embed.spatial") == 0
    assert model.layer_id("cls_token") == 0
    assert model.layer_id("blocks.0.attn.qkv.weight") == 1
    assert model.layer_id(f"blocks.{depth - 1}.mlp.fc2.bias") == depth
    assert model.layer_id("head.weight") == depth + 1
    assert model.layer_id("norm.weight") == depth + 1
    assert model.no_weight_decay() == {"cls_token", "pos_embed.spatial", "pos_embed.temporal", "pos_embed.cls"}


def test_head_init_scale_shrinks_the_fresh_head():
    model = build_classifier(ClassifierConfig(debug_vit(), num_classes=10, head_init_scale=0.001))
    assert 0.7 * 2e-5 < model.head.weight.std() < 1.3 * 2e-5
    assert 0.7 * 0.02 < model.blocks[0].mlp.fc1.weight.std() < 1.3 * 0.02


@pytest.mark.parametrize("target", [dict(), dict(normalize="joint"), dict(normalize="none"),
                                    dict(frames="first", normalize="none")])
def test_reconstruct_inverts_perfect_predictions(target):
    """Feeding the exact targets back as predictions must give the input pixels (per-patch stats inverted)."""
    model = make_pretrain(**target).eval()
    video, mask = torch.rand(2, 3, 8, 32, 32) * 2 - 1, fixed_count_mask(2, 64, 48)
    perfect = model.targets(video)[mask].reshape(2, 48, -1)
    picture = model.reconstruct(video, perfect, mask)
    raw = model.pixels(video).clamp(0, 1)
    if target.get("frames") == "first":
        raw_first = raw[:, :, ::2].repeat_interleave(2, dim=2)
        hidden = unpatchify(mask[..., None].float().expand(-1, -1, 2 * 8 * 8 * 3), (4, 4, 4), 2, 8).bool()
        raw = torch.where(hidden, raw_first, raw)
    torch.testing.assert_close(picture, raw, atol=1e-4, rtol=0)
