"""AVA action detector: RoI head shapes and routing, RoIAlign conventions, position tables on whole frames,
checkpointing, initial weights from every checkpoint kind, optimizer and FLOP hooks, the loss."""

import copy

import pytest
import torch
import torch.nn.functional as F

from engine.optim import param_groups
from models.detection import (
    ActionDetector,
    DetectorConfig,
    FramewisePositionEmbedding,
    build_detector,
    detection_loss,
    load_encoder_weights,
    pad_to_patches,
    roi_max_features,
)
from models.flops import linear_flops
from models.pos_embed import PositionEmbedding, resample_spatial, sincos_table
from models.videomae import PretrainModelConfig, VideoMAE
from models.vit import ClassifierConfig, VisionTransformer, ViTConfig, build_classifier

from helpers import randomize

NUM_CLASSES = 5
PATCH = 8


def tiny_vit(**overrides) -> ViTConfig:
    fields = dict(arch="vit_debug", num_frames=4, img_size=32, patch_size=PATCH)
    fields.update(overrides)
    return ViTConfig(**fields)


def tiny_detector(dropout=0.0, head_init_scale=1.0, **encoder) -> ActionDetector:
    # A full-size head init, so that logits visibly depend on the features.
    cfg = DetectorConfig(tiny_vit(**encoder), num_classes=NUM_CLASSES, dropout=dropout,
                         head_init_scale=head_init_scale)
    return ActionDetector(cfg)


def rois(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 5)


# ---- shapes, gradients, routing --------------------------------------------------------------------------------


def test_logits_per_box_with_several_boxes_and_clips_without_any():
    model = tiny_detector()
    video = torch.randn(3, 3, 4, 32, 32)
    # Clip 1 has no box; rows of different clips interleave.
    boxes = rois([0, 1, 2, 20, 30], [2, 0, 0, 32, 32], [0, 8, 8, 16, 24], [2, 4, 5, 12, 31], [2, 0, 10, 9, 20])
    assert model(video, boxes).shape == (5, NUM_CLASSES)


def test_no_box_at_all_gives_an_empty_batch_and_a_zero_loss_that_backpropagates():
    model = tiny_detector(dropout=0.5).train()
    logits = model(torch.randn(2, 3, 4, 32, 32), torch.zeros(0, 5))
    assert logits.shape == (0, NUM_CLASSES)
    loss = detection_loss(logits, torch.zeros(0, NUM_CLASSES))
    assert loss.item() == 0.0 and loss.dtype == torch.float32
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.all(p.grad == 0), name


def test_gradients_reach_the_encoder_and_the_head():
    model = tiny_detector(dropout=0.5).train()
    boxes = rois([0, 0, 0, 20, 24], [1, 10, 4, 32, 30], [1, 2, 2, 9, 9])
    targets = torch.tensor([[1, 0, 0, 1, 0], [0, 0, 0, 0, 0], [0, 1, 0, 0, 0]], dtype=torch.float32)
    detection_loss(model(torch.randn(2, 3, 4, 32, 32), boxes), targets).backward()
    for name in ["encoder.patch_embed.proj.weight", "encoder.blocks.0.attn.qkv.weight", "encoder.blocks.1.mlp.fc2.bias",
                 "encoder.norm.weight", "head.weight", "head.bias"]:
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_boxes_read_the_clip_of_their_batch_index():
    model = tiny_detector().eval()
    video = torch.randn(2, 3, 4, 32, 32)
    boxes = rois([0, 0, 0, 20, 24], [1, 4, 4, 28, 28], [0, 8, 8, 32, 32], [1, 0, 0, 32, 32])
    before = model(video, boxes)
    perturbed = video.clone()
    perturbed[1] += torch.randn_like(perturbed[1])
    after = model(perturbed, boxes)
    clip0, clip1 = boxes[:, 0] == 0, boxes[:, 0] == 1
    torch.testing.assert_close(after[clip0], before[clip0], rtol=0, atol=1e-6)
    assert (after[clip1] - before[clip1]).abs().amax(dim=1).min() > 1e-3


def test_a_bfloat16_model_pools_boxes_in_float32_and_returns_logits_in_its_dtype():
    # RoIAlign has no bfloat16 CPU kernel: this runs only because the RoI head works in float32.
    model = tiny_detector().to(torch.bfloat16).eval()
    logits = model(torch.randn(1, 3, 4, 32, 32), rois([0, 1, 1, 30, 30]))
    assert logits.dtype == torch.bfloat16 and logits.shape == (1, NUM_CLASSES)


# ---- RoIAlign conventions --------------------------------------------------------------------------------------


def test_a_box_inside_a_constant_region_pools_that_value():
    """Map of 3 on columns 0..3 and 7 on columns 4..7 (stride 8: pixels 0..31 and 32..63), two clips."""
    fmap = torch.full((2, 1, 6, 8), 3.0)
    fmap[:, :, :, 4:] = 7.0
    fmap[1] += 10.0
    # Feature coordinate u = x / 8 - 0.5; the box spans u in [0.5, 2.5], samples never reach column 4.
    left = [8, 8, 24, 40]
    # u in [1, 6]: the last bins sample inside the 7-region, and the max picks it.
    across = [12, 8, 52, 40]
    out = roi_max_features(fmap, rois([0, *left], [0, *across], [1, *left]), roi_size=7, stride=8)
    torch.testing.assert_close(out, torch.tensor([[3.0], [7.0], [13.0]]), rtol=0, atol=1e-6)


def test_roi_align_on_a_ramp_is_the_centre_of_the_last_bin():
    """On f(u) = u (column index) bilinear sampling is exact, every bin averages to its centre value, and the max is
    the last bin's centre: u2 − (u2 − u1) / (2 · roi_size) with u = x / stride − 0.5 (aligned)."""
    fmap = torch.arange(8.0).expand(1, 1, 6, 8).contiguous()
    x1, x2 = 12.0, 40.0
    u1, u2 = x1 / 8 - 0.5, x2 / 8 - 0.5
    out = roi_max_features(fmap, rois([0, x1, 10, x2, 30]), roi_size=7, stride=8)
    torch.testing.assert_close(out, torch.tensor([[u2 - (u2 - u1) / 14]]), rtol=0, atol=1e-6)


def test_feature_map_is_the_time_mean_of_the_normed_tokens():
    model = randomize(tiny_detector()).eval()
    video = torch.randn(2, 3, 4, 32, 32)
    tokens = model.encoder.forward_features(video)  # (2, 2·4·4, D)
    expected = tokens.reshape(2, 2, 4, 4, -1).mean(dim=1).permute(0, 3, 1, 2)
    torch.testing.assert_close(model.feature_map(video), expected, rtol=1e-5, atol=1e-6)


def test_forward_is_roi_max_dropout_linear_on_the_feature_map():
    model = randomize(tiny_detector()).eval()
    video, boxes = torch.randn(2, 3, 4, 32, 32), rois([0, 1, 2, 20, 30], [1, 3, 3, 31, 31])
    pooled = roi_max_features(model.feature_map(video), boxes, 7, PATCH)
    torch.testing.assert_close(model(video, boxes), model.head(pooled))


# ---- position tables and frame sizes ---------------------------------------------------------------------------


def test_sincos_table_at_the_training_grid_is_unchanged():
    model = randomize(tiny_detector()).eval()
    grid = model.cfg.encoder.grid
    assert isinstance(model.encoder.pos_embed, FramewisePositionEmbedding)
    assert torch.equal(model.encoder.pos_embed(grid), PositionEmbedding("sincos", grid, 64)(grid))
    assert torch.equal(model.encoder.pos_embed(grid), sincos_table(32, 64))
    # The same weights in a plain encoder give the same tokens at the training size.
    plain = VisionTransformer(model.cfg.encoder, global_pool="none")
    plain.load_state_dict(model.encoder.state_dict())
    video = torch.randn(1, 3, 4, 32, 32)
    torch.testing.assert_close(model.encoder.forward_features(video), plain.forward_features(video), rtol=0, atol=0)
    assert set(model.state_dict()) == {f"encoder.{k}" for k in plain.state_dict()} | {"head.weight", "head.bias"}


@pytest.mark.parametrize("frames", [2, 4])
def test_sincos_table_on_another_frame_size_resamples_each_training_frame(frames):
    pos = tiny_detector().encoder.pos_embed
    grid = (frames, 32, 40)  # a 256 × 320 frame at patch 8
    table = pos(grid)
    assert table.shape == (1, frames * 32 * 40, 64)
    # Frame t of the training layout (the 1-D table over t·4·4 + y·4 + x), resampled to 32 × 40.
    training = sincos_table(frames * 16, 64).reshape(frames, 16, 64)
    for t in range(frames):
        expected = resample_spatial(training[t][None], (32, 40), (4, 4))
        torch.testing.assert_close(table[:, t * 1280:(t + 1) * 1280], expected, rtol=0, atol=1e-6)
    # Not the rebuilt 1-D table, which would shift every row.
    assert not torch.allclose(table, sincos_table(frames * 32 * 40, 64), atol=1e-2)


@pytest.mark.parametrize("encoder", [dict(), dict(pos_embed="separable", cls_token=True)], ids=["sincos", "separable"])
def test_a_256_by_320_input_runs(encoder):
    model = tiny_detector(**encoder).eval()
    boxes = rois([0, 0, 0, 320, 256], [0, 250, 100, 319, 255], [1, 10, 20, 60, 200])
    logits = model(torch.randn(2, 3, 4, 256, 320), boxes)
    assert logits.shape == (3, NUM_CLASSES) and torch.isfinite(logits).all()


def test_sides_off_the_patch_grid_are_zero_padded_bottom_right():
    model = randomize(tiny_detector()).eval()
    video, boxes = torch.randn(1, 3, 4, 36, 45), rois([0, 2, 3, 40, 30])
    padded = F.pad(video, (0, 3, 0, 4))
    assert torch.equal(pad_to_patches(video, PATCH), padded)
    torch.testing.assert_close(model(video, boxes), model(padded, boxes), rtol=0, atol=0)
    with pytest.raises(ValueError, match="tubelets"):
        model(torch.randn(1, 3, 3, 32, 32), boxes)


def test_boxes_must_be_k_by_5():
    model = tiny_detector()
    with pytest.raises(ValueError, match=r"\(K, 5\)"):
        model(torch.randn(1, 3, 4, 32, 32), torch.zeros(2, 4))


# ---- activation checkpointing ----------------------------------------------------------------------------------


def outputs_and_grads(model, video, boxes, targets):
    torch.manual_seed(123)  # drop path and dropout draw random numbers: the same stream for every variant
    logits = model(video, boxes)
    detection_loss(logits, targets).backward()
    return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["torch", "fairscale"])
def test_checkpointing_gives_identical_outputs_and_gradients(mode):
    plain = tiny_detector(dropout=0.5, drop_path=0.2).train()
    cfg = copy.deepcopy(plain.cfg)
    cfg.encoder.checkpointing = mode
    checkpointed = ActionDetector(cfg).train()
    checkpointed.load_state_dict(plain.state_dict())
    assert set(checkpointed.state_dict()) == set(plain.state_dict())

    video = torch.randn(2, 3, 4, 32, 32)
    boxes = rois([0, 0, 0, 20, 24], [1, 10, 4, 32, 30])
    targets = torch.tensor([[1, 0, 0, 1, 0], [0, 1, 0, 0, 0]], dtype=torch.float32)
    logits_a, grads_a = outputs_and_grads(plain, video, boxes, targets)
    logits_b, grads_b = outputs_and_grads(checkpointed, video, boxes, targets)
    torch.testing.assert_close(logits_a, logits_b, rtol=0, atol=0)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-6, atol=1e-7, msg=name)


# ---- initial weights -------------------------------------------------------------------------------------------


def test_loads_a_videomae_pretraining_checkpoint_with_its_final_norm():
    pretrain = randomize(VideoMAE(PretrainModelConfig(tiny_vit())))
    model = tiny_detector()
    head = model.head.weight.clone()
    report = load_encoder_weights(model, {"model": pretrain.state_dict()})  # wrapped, as our checkpoints are
    for key, value in pretrain.encoder.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[key], value), key
    assert report.norm_source == "norm"
    assert report.fresh == ["head.bias", "head.weight"]
    assert "encoder_to_decoder.weight" in report.dropped and "mask_token" in report.dropped
    assert any(k.startswith("decoder.blocks.") for k in report.dropped)
    assert {"encoder.norm.weight", "encoder.blocks.0.attn.qkv.weight"} <= set(report.loaded)
    assert torch.equal(model.head.weight, head)  # the head is not touched
    video = torch.randn(1, 3, 4, 32, 32)
    torch.testing.assert_close(model.encoder.forward_features(video), pretrain.encoder.forward_features(video))
    assert "final norm: norm" in str(report)


def mean_classifier() -> VisionTransformer:
    return randomize(build_classifier(ClassifierConfig(tiny_vit(), num_classes=7, global_pool="mean")), seed=1)


def test_a_mean_pooling_fine_tuned_checkpoint_starts_a_fresh_norm_by_default():
    classifier = mean_classifier()
    model = randomize(tiny_detector())
    report = load_encoder_weights(model, classifier.state_dict())
    assert report.norm_source == "fresh"
    assert set(report.dropped) == {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
    assert report.fresh == ["encoder.norm.bias", "encoder.norm.weight", "head.bias", "head.weight"]
    assert torch.equal(model.encoder.norm.weight, torch.ones(64))
    assert torch.equal(model.encoder.norm.bias, torch.zeros(64))
    own = model.encoder.state_dict()
    for key, value in classifier.state_dict().items():
        if not key.startswith(("head.", "fc_norm.")):
            assert torch.equal(own[key], value), key


def test_a_mean_pooling_fine_tuned_checkpoint_can_give_its_fc_norm():
    classifier = mean_classifier()
    model = tiny_detector()
    report = load_encoder_weights(model, classifier.state_dict(), norm_from_fc_norm=True)
    assert report.norm_source == "fc_norm"
    assert set(report.dropped) == {"head.weight", "head.bias"}
    assert report.fresh == ["head.bias", "head.weight"]
    assert torch.equal(model.encoder.norm.weight, classifier.fc_norm.weight)
    assert torch.equal(model.encoder.norm.bias, classifier.fc_norm.bias)


def test_a_token_pooling_fine_tuned_checkpoint_gives_its_final_norm():
    classifier = randomize(build_classifier(ClassifierConfig(tiny_vit(), num_classes=7, global_pool="first")))
    model = tiny_detector()
    report = load_encoder_weights(model, classifier.state_dict())
    assert report.norm_source == "norm"
    assert set(report.dropped) == {"head.weight", "head.bias"}
    assert torch.equal(model.encoder.norm.weight, classifier.norm.weight)


def test_separable_tables_of_another_grid_are_resampled():
    source = randomize(build_classifier(ClassifierConfig(tiny_vit(pos_embed="separable", num_frames=8,
                                                                  img_size=48), num_classes=7)))
    model = tiny_detector(pos_embed="separable")
    report = load_encoder_weights(model, source.state_dict())
    assert set(report.resampled) == {"encoder.pos_embed.spatial", "encoder.pos_embed.temporal"}
    assert model.encoder.pos_embed.spatial.shape == (1, 16, 64)


def test_a_hugging_face_pretraining_checkpoint_loads():
    transformers = pytest.importorskip("transformers")
    config = transformers.VideoMAEConfig(
        image_size=32, patch_size=8, num_frames=4, tubelet_size=2, hidden_size=64, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=256, decoder_hidden_size=32, decoder_num_hidden_layers=1,
        decoder_num_attention_heads=2, decoder_intermediate_size=128, use_mean_pooling=False)
    hf = randomize(transformers.VideoMAEForPreTraining(config))
    model = tiny_detector()
    report = load_encoder_weights(model, hf.state_dict())
    assert report.norm_source == "norm"
    assert torch.equal(model.encoder.norm.weight, hf.videomae.layernorm.weight)
    assert any(k.startswith("decoder.") for k in report.dropped)


def test_a_checkpoint_of_another_width_is_an_error():
    other = VideoMAE(PretrainModelConfig(tiny_vit(embed_dim=32)))
    with pytest.raises(ValueError, match="do not fit"):
        load_encoder_weights(tiny_detector(), other.state_dict())


# ---- optimizer and FLOP hooks ----------------------------------------------------------------------------------


@pytest.mark.parametrize("encoder", [dict(), dict(pos_embed="separable", cls_token=True)], ids=["sincos", "separable"])
def test_layer_ids_and_no_weight_decay_cover_every_parameter(encoder):
    model = tiny_detector(**encoder)
    depth = model.depth
    names = [name for name, _ in model.named_parameters()]
    ids = {name: model.layer_id(name) for name in names}
    assert all(0 <= i <= depth + 1 for i in ids.values())
    assert ids["encoder.patch_embed.proj.weight"] == 0
    assert ids["encoder.blocks.0.attn.qkv.weight"] == 1
    assert ids[f"encoder.blocks.{depth - 1}.mlp.fc2.weight"] == depth
    assert ids["encoder.norm.weight"] == ids["head.weight"] == ids["head.bias"] == depth + 1
    expected = {"encoder.cls_token", "encoder.pos_embed.spatial", "encoder.pos_embed.temporal",
                "encoder.pos_embed.cls"} if encoder else set()
    assert model.no_weight_decay() == expected
    assert model.no_weight_decay() <= set(names)

    groups = param_groups(model, weight_decay=0.05, layer_decay=0.75)
    grouped = [p for group in groups for p in group["params"]]
    assert len(grouped) == len(names) and {id(p) for p in grouped} == {id(p) for p in model.parameters()}
    head_group = next(g for g in groups if any(p is model.head.weight for p in g["params"]))
    assert head_group["lr_scale"] == 1.0 and head_group["weight_decay"] == 0.05
    for group in groups:
        if any(p is model.head.bias for p in group["params"]):
            assert group["weight_decay"] == 0.0


def test_forward_flops_is_the_dense_encoder_plus_the_linear_per_box():
    model = tiny_detector()
    grid = (2, 32, 40)
    assert model.forward_flops(grid, 0) == model.encoder.forward_flops(grid)
    assert model.forward_flops(grid, 10) == model.encoder.forward_flops(grid) + linear_flops(10, 64, NUM_CLASSES)
    assert model.forward_flops(grid, 2.5) == model.encoder.forward_flops(grid) + 2 * 2.5 * 64 * NUM_CLASSES


# ---- loss and configuration ------------------------------------------------------------------------------------


def test_detection_loss_is_bce_with_logits_in_float32():
    logits = torch.randn(4, NUM_CLASSES, dtype=torch.float64)
    targets = (torch.rand(4, NUM_CLASSES) > 0.7).double()
    p = torch.sigmoid(logits)
    expected = -(targets * p.log() + (1 - targets) * (1 - p).log()).mean()
    loss = detection_loss(logits.bfloat16(), targets)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), expected, rtol=2e-2, atol=0)
    torch.testing.assert_close(detection_loss(logits.float(), targets), expected.float())
    with pytest.raises(ValueError, match="shape"):
        detection_loss(logits, targets[:, :3])


def test_head_init_scale_and_config_checks():
    model = ActionDetector(DetectorConfig(tiny_vit(), num_classes=10, head_init_scale=0.001))
    assert 0.7 * 2e-5 < model.head.weight.std() < 1.3 * 2e-5
    assert torch.equal(model.head.bias, torch.zeros(10))
    for bad in [dict(num_classes=0), dict(dropout=1.0), dict(roi_size=0)]:
        with pytest.raises(ValueError):
            DetectorConfig(tiny_vit(), **bad)


def test_builds_every_size_on_meta():
    for arch in ["vit_small", "vit_base", "vit_large", "vit_huge"]:
        with torch.device("meta"):
            model = build_detector(DetectorConfig(ViTConfig(arch=arch)))
        assert model.head.weight.shape == (80, model.embed_dim)
