"""Checkpoint conversion: Hugging Face VideoMAE ↔ ours (numerically), official VideoMAE layouts, key errors."""

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers import VideoMAEConfig, VideoMAEForPreTraining, VideoMAEForVideoClassification  # noqa: E402

from models.convert import (  # noqa: E402
    DEFAULT_HF_NAMING,
    hf_to_ours,
    load_into_classifier,
    load_into_pretrain,
    official_to_classifier,
    official_to_pretrain,
    ours_to_hf,
    unwrap_state_dict,
)
from models.videomae import DecoderConfig, PretrainModelConfig, TargetConfig, VideoMAE  # noqa: E402
from models.vit import ClassifierConfig, ViTConfig, build_classifier  # noqa: E402

from helpers import randomize

BATCH = 2
ATOL = 1e-5
HEAD_KEYS = {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}


# ---- models ------------------------------------------------------------------------------------------------------


def eval_randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """``helpers.randomize`` in eval mode: conversions are compared on inference outputs."""
    return randomize(model, seed).eval()


def hf_config(**overrides) -> VideoMAEConfig:
    kwargs = dict(
        image_size=32, patch_size=8, num_frames=4, tubelet_size=2, hidden_size=64, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=256, decoder_hidden_size=32, decoder_num_hidden_layers=2,
        decoder_num_attention_heads=2, decoder_intermediate_size=128, layer_norm_eps=1e-6, norm_pix_loss=True,
        attn_implementation="eager",
    )
    return VideoMAEConfig(**{**kwargs, **overrides})


def hf_pretrain(norm_pix_loss: bool = True, seed: int = 0) -> VideoMAEForPreTraining:
    # Pre-training configs on the Hub set use_mean_pooling=False: that builds the encoder's final LayerNorm.
    model = VideoMAEForPreTraining(hf_config(norm_pix_loss=norm_pix_loss, use_mean_pooling=False))
    model.decoder.norm.eps = 1e-6  # HF hard-codes the default 1e-5 here; ours uses 1e-6 everywhere
    return eval_randomized(model, seed)


def hf_classifier(seed: int = 0, use_mean_pooling: bool = True) -> VideoMAEForVideoClassification:
    """``use_mean_pooling=False``: no fc_norm; the final LayerNorm over all tokens, then the first token."""
    model = VideoMAEForVideoClassification(hf_config(use_mean_pooling=use_mean_pooling, num_labels=5))
    if use_mean_pooling:
        model.fc_norm.eps = 1e-6  # same hard-coded 1e-5 as the decoder norm
    return eval_randomized(model, seed)


# Our pooling for each HF use_mean_pooling.
POOL_OF_HF = {True: "mean", False: "first"}


def encoder_config(**overrides) -> ViTConfig:
    return ViTConfig(
        arch="vit_debug", embed_dim=64, depth=2, num_heads=4, num_frames=4, img_size=32, patch_size=8, **overrides
    )


def ours_pretrain(normalize: str = "per_channel", attention: str = "sdpa") -> VideoMAE:
    cfg = PretrainModelConfig(
        encoder=encoder_config(attention=attention),
        decoder=DecoderConfig(embed_dim=32, depth=2, num_heads=2),
        target=TargetConfig(normalize=normalize),
    )
    return VideoMAE(cfg).eval()


def ours_classifier(global_pool: str = "mean", num_classes: int = 5, **encoder_overrides) -> nn.Module:
    cfg = ClassifierConfig(encoder=encoder_config(**encoder_overrides), num_classes=num_classes,
                           global_pool=global_pool)
    return build_classifier(cfg).eval()


# ---- inputs ------------------------------------------------------------------------------------------------------


def video_and_mask(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A normalized clip (B, C, T, H, W) and a tube mask (B, 32): the same 12 of 16 spatial positions hidden in
    both time slices, chosen differently per sample (every sample hides the same number of tokens)."""
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(BATCH, 3, 4, 32, 32, generator=g)
    spatial = torch.stack([torch.randperm(16, generator=g) < 12 for _ in range(BATCH)])
    return video, spatial.repeat(1, 2)  # tokens are t-major


def to_hf(video: torch.Tensor) -> torch.Tensor:
    return video.transpose(1, 2).contiguous()  # HF takes (B, T, C, H, W)


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


def assert_same_tensors(actual: dict, expected: dict) -> None:
    assert set(actual) == set(expected)
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key


def to_v4_naming(hf_sd: dict) -> dict:
    """Rename transformers v5 q/v biases to the names of v4 checkpoints."""
    renames = {"attention.query.bias": "attention.q_bias", "attention.value.bias": "attention.v_bias"}
    out = {}
    for key, value in hf_sd.items():
        for new, old in renames.items():
            key = key.replace(new, old)
        out[key] = value
    return out


# ---- Hugging Face → ours: same outputs ---------------------------------------------------------------------------


@pytest.mark.parametrize("attention", ["sdpa", "manual"])
@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_hf_pretraining_matches_ours(norm_pix_loss, attention):
    hf = hf_pretrain(norm_pix_loss)
    ours = ours_pretrain("per_channel" if norm_pix_loss else "none", attention)
    ours.load_state_dict(hf_to_ours(hf.state_dict(), pretrain=True), strict=True)
    video, mask = video_and_mask()
    with torch.no_grad():
        ref = hf(pixel_values=to_hf(video), bool_masked_pos=mask)
        loss, pred, _ = ours(video, mask)
    assert pred.shape == ref.logits.shape == (BATCH, 24, 3 * 2 * 8 * 8)
    assert_close(pred, ref.logits)
    assert_close(loss, ref.loss)


@pytest.mark.parametrize("use_mean_pooling", [True, False])
def test_hf_classification_matches_ours(use_mean_pooling):
    hf = hf_classifier(use_mean_pooling=use_mean_pooling)
    ours = ours_classifier(POOL_OF_HF[use_mean_pooling])
    ours.load_state_dict(hf_to_ours(hf.state_dict(), pretrain=False), strict=True)
    video, _ = video_and_mask()
    with torch.no_grad():
        ref = hf(pixel_values=to_hf(video)).logits
        logits = ours(video)
    assert logits.shape == (BATCH, 5)
    assert_close(logits, ref)


def test_hf_v4_naming_is_accepted():
    for model, pretrain in [(hf_pretrain(), True), (hf_classifier(), False)]:
        v5 = model.state_dict()
        v4 = to_v4_naming(v5)
        assert any(k.endswith("attention.attention.q_bias") for k in v4)
        assert_same_tensors(hf_to_ours(v4, pretrain=pretrain), hf_to_ours(v5, pretrain=pretrain))


# ---- ours → Hugging Face -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("naming", ["v4", "v5"])
@pytest.mark.parametrize("pretrain, pool", [(True, None), (False, "mean"), (False, "first")])
def test_round_trip_through_hf_is_exact(naming, pretrain, pool):
    ours = eval_randomized(ours_pretrain() if pretrain else ours_classifier(pool), seed=2)
    hf_sd = ours_to_hf(ours.state_dict(), pretrain=pretrain, naming=naming)
    assert not any(k.endswith("key.bias") for k in hf_sd)  # HF's key projection has no bias
    q_bias = "attention.attention.q_bias" if naming == "v4" else "attention.attention.query.bias"
    assert any(k.endswith(q_bias) for k in hf_sd)
    assert_same_tensors(hf_to_ours(hf_sd, pretrain=pretrain), ours.state_dict())


def test_default_naming_follows_installed_transformers():
    major = int(transformers.__version__.split(".")[0])
    assert DEFAULT_HF_NAMING == ("v5" if major >= 5 else "v4")


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_exported_pretraining_model_runs_in_hf(norm_pix_loss):
    ours = eval_randomized(ours_pretrain("per_channel" if norm_pix_loss else "none"), seed=3)
    hf = hf_pretrain(norm_pix_loss, seed=4)
    hf.load_state_dict(ours_to_hf(ours.state_dict(), pretrain=True), strict=True)
    video, mask = video_and_mask(seed=5)
    with torch.no_grad():
        ref = hf(pixel_values=to_hf(video), bool_masked_pos=mask)
        loss, pred, _ = ours(video, mask)
    assert_close(pred, ref.logits)
    assert_close(loss, ref.loss)


@pytest.mark.parametrize("use_mean_pooling", [True, False])
def test_exported_classifier_runs_in_hf(use_mean_pooling):
    ours = eval_randomized(ours_classifier(POOL_OF_HF[use_mean_pooling]), seed=3)
    hf = hf_classifier(seed=4, use_mean_pooling=use_mean_pooling)
    hf.load_state_dict(ours_to_hf(ours.state_dict(), pretrain=False), strict=True)
    video, _ = video_and_mask(seed=5)
    with torch.no_grad():
        assert_close(ours(video), hf(pixel_values=to_hf(video)).logits)


def test_hf_classifier_without_mean_pooling_is_never_loaded_as_another_model():
    """HF's use_mean_pooling=False classifier reads the first token after the final LayerNorm: loaded into mean
    pooling it would keep the trained head but feed it other features (a fresh fc_norm of the mean)."""
    hf = hf_classifier(seed=6, use_mean_pooling=False)
    with pytest.raises(ValueError, match=r"use_mean_pooling=False.*model\.global_pool=first"):
        load_into_classifier(ours_classifier("mean"), hf.state_dict())

    ours = ours_classifier("first")
    report = load_into_classifier(ours, hf.state_dict())
    assert report.dropped == [] and report.fresh == []
    video, _ = video_and_mask()
    with torch.no_grad():
        assert_close(ours(video), hf(pixel_values=to_hf(video)).logits)

    # For another class count the head is dropped anyway: its encoder starts a mean-pooling classifier, as a
    # pre-trained encoder does, and the report lists what went.
    report = load_into_classifier(ours_classifier("mean", num_classes=7), hf.state_dict())
    assert sorted(report.dropped) == ["head.bias", "head.weight", "norm.bias", "norm.weight"]
    assert sorted(report.fresh) == sorted(HEAD_KEYS)

    # And the reverse: a head trained on fc_norm of the mean is no first-token classifier.
    with pytest.raises(ValueError, match=r"use_mean_pooling=True.*model\.global_pool=mean"):
        load_into_classifier(ours_classifier("first"), hf_classifier().state_dict())


def test_hf_pretraining_loads_into_our_pretraining_model():
    hf = hf_pretrain(seed=7)
    ours = ours_pretrain()
    report = load_into_pretrain(ours, hf.state_dict())
    assert report.dropped == []
    video, mask = video_and_mask()
    with torch.no_grad():
        assert_close(ours(video, mask)[1], hf(pixel_values=to_hf(video), bool_masked_pos=mask).logits)


# ---- official VideoMAE checkpoints -------------------------------------------------------------------------------


def wrapped_checkpoints(sd: dict) -> dict[str, dict]:
    """The same state dict as training scripts save it."""
    return {
        "raw": dict(sd),
        "model": {"model": dict(sd), "epoch": 799},
        "deepspeed": {"module": {f"module.{k}": v for k, v in sd.items()}},
        "compiled": {f"_orig_mod.{k}": v for k, v in sd.items()},
        "ddp+compiled": {"model_state": {f"module._orig_mod.{k}": v for k, v in sd.items()}},
    }


def test_unwrap_state_dict():
    sd = eval_randomized(ours_classifier()).state_dict()
    for name, checkpoint in wrapped_checkpoints(sd).items():
        assert_same_tensors(unwrap_state_dict(checkpoint), sd)
    with pytest.raises(ValueError, match="no state dict found"):
        unwrap_state_dict({"epoch": 3, "optimizer": {"state": {}}})


def test_official_pretraining_checkpoint():
    sd = eval_randomized(ours_pretrain()).state_dict()
    encoder_keys = {k for k in sd if k.startswith("encoder.")}
    pretrain_only = {k for k in sd if k.startswith("decoder.")} | {"encoder_to_decoder.weight", "mask_token"}
    for name, checkpoint in wrapped_checkpoints(sd).items():
        converted, report = official_to_pretrain(checkpoint)
        assert_same_tensors(converted, sd)
        assert report.dropped == [] and report.renamed == 0

        converted, report = official_to_classifier(checkpoint)
        # Mean pooling: the encoder's final norm is dropped with the decoder, as VideoMAE's fine-tuning does.
        assert set(report.dropped) == pretrain_only | {"encoder.norm.weight", "encoder.norm.bias"}, name
        assert report.renamed == len(encoder_keys) - 2
        for key, value in converted.items():
            assert torch.equal(value, sd[f"encoder.{key}"])

        classifier = ours_classifier()
        result = classifier.load_state_dict(converted, strict=False)
        assert set(result.missing_keys) == HEAD_KEYS and result.unexpected_keys == []


def test_official_pretraining_checkpoint_keeps_norm_for_cls_pooling():
    converted, report = official_to_classifier(ours_pretrain().state_dict(), global_pool="cls")
    assert {"norm.weight", "norm.bias"} <= set(converted)
    assert not any(k.startswith("encoder.norm") for k in report.dropped)


@pytest.mark.parametrize("prefix", ["", "backbone."])
def test_official_finetuned_checkpoint(prefix):
    sd = eval_randomized(ours_classifier()).state_dict()
    converted, report = official_to_classifier({"module": {f"{prefix}{k}": v for k, v in sd.items()}})
    assert_same_tensors(converted, sd)
    assert report.dropped == [] and report.renamed == (len(sd) if prefix else 0)
    ours_classifier().load_state_dict(converted, strict=True)


# ---- errors ------------------------------------------------------------------------------------------------------


def test_unknown_keys_are_named():
    hf_sd = hf_classifier().state_dict()
    with pytest.raises(ValueError, match=r"videomae\.pooler\.dense\.weight"):
        hf_to_ours({**hf_sd, "videomae.pooler.dense.weight": torch.zeros(1)}, pretrain=False)
    k_bias = "videomae.encoder.layer.0.attention.attention.key.bias"
    with pytest.raises(ValueError, match=k_bias.replace(".", r"\.")):
        hf_to_ours({**hf_sd, k_bias: torch.zeros(64)}, pretrain=False)
    with pytest.raises(ValueError, match=r"fc_norm\.weight"):  # a classifier state dict is no pre-training one
        hf_to_ours(hf_sd, pretrain=True)

    ours_sd = ours_classifier().state_dict()
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.bogus"):
        ours_to_hf({**ours_sd, "blocks.0.attn.bogus": torch.zeros(1)}, pretrain=False)
    with pytest.raises(ValueError, match=r"blocks\.1\.gamma_2"):  # HF VideoMAE has no LayerScale
        ours_to_hf(ours_classifier(layer_scale_init=0.1).state_dict(), pretrain=False)
    decoder_layer_scale = PretrainModelConfig(encoder_config(), DecoderConfig(32, 2, 2, layer_scale_init=0.1))
    with pytest.raises(ValueError, match=r"decoder\.blocks\.1\.gamma_2"):  # nor in its decoder
        ours_to_hf(VideoMAE(decoder_layer_scale).state_dict(), pretrain=True)

    with pytest.raises(ValueError, match=r"encoder\.pos_embed"):  # a learnable joint table we cannot hold
        official_to_classifier({**ours_sd, "encoder.pos_embed": torch.zeros(1, 32, 64)})
    pretrain_sd = ours_pretrain().state_dict()
    with pytest.raises(ValueError, match=r"head\.weight"):  # a classifier key in a pre-training checkpoint
        official_to_pretrain({**pretrain_sd, "head.weight": torch.zeros(5, 64)})
    with pytest.raises(ValueError, match=r"unrecognised keys .*blocks\.0\.attn\.proj\.bias"):
        official_to_pretrain(ours_sd)  # a fine-tuned checkpoint is no pre-training one


def test_hf_pretraining_without_encoder_norm_is_refused():
    hf = VideoMAEForPreTraining(hf_config(use_mean_pooling=True))
    with pytest.raises(ValueError, match="use_mean_pooling"):
        hf_to_ours(hf.state_dict(), pretrain=True)


def test_incomplete_hf_attention_is_refused():
    hf_sd = hf_classifier().state_dict()
    del hf_sd["videomae.encoder.layer.1.attention.attention.key.weight"]
    with pytest.raises(ValueError, match="key"):
        hf_to_ours(hf_sd, pretrain=False)


def test_our_own_mae_st_weights_round_trip_through_the_official_loaders():
    """Separable position tables and a cls token (MAE-ST options) are part of our layout too."""
    from models.convert import official_to_classifier, official_to_pretrain
    from models.videomae import DecoderConfig, PretrainModelConfig, VideoMAE
    from models.vit import ClassifierConfig, ViTConfig, build_classifier

    encoder = ViTConfig(arch="vit_debug", num_frames=4, img_size=32, patch_size=8, pos_embed="separable",
                        cls_token=True)
    pretrain = VideoMAE(PretrainModelConfig(encoder, DecoderConfig(depth=1, pos_embed="separable")))
    state, _ = official_to_pretrain({"model": pretrain.state_dict()})
    VideoMAE(PretrainModelConfig(encoder, DecoderConfig(depth=1, pos_embed="separable"))).load_state_dict(state)
    classifier = build_classifier(ClassifierConfig(encoder, num_classes=3, global_pool="cls"))
    mapped, report = official_to_classifier(pretrain.state_dict(), global_pool="cls")
    missing, unexpected = classifier.load_state_dict(mapped, strict=False)
    assert sorted(missing) == ["head.bias", "head.weight"] and not unexpected
    assert "decoder_pos_embed.spatial" in report.dropped
    assert torch.equal(classifier.pos_embed.spatial, pretrain.encoder.pos_embed.spatial)


@pytest.mark.parametrize("frames,size", [(8, 32), (32, 32), (16, 48)])
def test_a_16_frame_pre_training_loads_into_other_frame_counts_and_sizes(frames, size):
    from models.convert import load_into_classifier
    from models.videomae import DecoderConfig, PretrainModelConfig, VideoMAE
    from models.vit import ClassifierConfig, ViTConfig, build_classifier

    def encoder(pos, **geometry):
        return ViTConfig(arch="vit_debug", patch_size=8, pos_embed=pos, **{"num_frames": 16, "img_size": 32,
                                                                          **geometry})

    for pos in ("sincos", "separable"):
        pretrain = VideoMAE(PretrainModelConfig(encoder(pos), DecoderConfig(depth=1)))
        classifier = build_classifier(ClassifierConfig(encoder(pos, num_frames=frames, img_size=size),
                                                       num_classes=5))
        report = load_into_classifier(classifier, {"model": pretrain.state_dict()})
        assert report.fresh == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
        assert "encoder_to_decoder.weight" in report.dropped and "mask_token" in report.dropped
        resized = (frames != 16) + (size != 32) if pos == "separable" else 0
        assert len(report.resampled) == resized
        torch.testing.assert_close(classifier.blocks[1].mlp.fc2.weight, pretrain.encoder.blocks[1].mlp.fc2.weight)
        assert classifier(torch.randn(1, 3, frames, size, size)).shape == (1, 5)


def test_a_head_of_another_class_count_is_dropped_and_reported():
    from models.convert import load_into_classifier
    from models.vit import ClassifierConfig, ViTConfig, build_classifier

    encoder = ViTConfig(arch="vit_debug", num_frames=4, img_size=32, patch_size=8)
    finetuned = build_classifier(ClassifierConfig(encoder, num_classes=400))
    target = build_classifier(ClassifierConfig(encoder, num_classes=7))
    report = load_into_classifier(target, {"module": finetuned.state_dict()})
    assert {"head.weight", "head.bias"} <= set(report.dropped)
    assert report.fresh == ["head.bias", "head.weight"]
    torch.testing.assert_close(target.fc_norm.weight, finetuned.fc_norm.weight)
    bigger = build_classifier(ClassifierConfig(ViTConfig(arch="vit_debug", num_frames=4, img_size=32,
                                                         patch_size=8, depth=3), num_classes=7))
    with pytest.raises(ValueError, match="missing.*blocks.2"):
        load_into_classifier(bigger, finetuned.state_dict())


def test_hugging_face_state_dicts_load_into_the_classifier():
    from models.convert import load_into_classifier, ours_to_hf
    from models.vit import ClassifierConfig, ViTConfig, build_classifier

    encoder = ViTConfig(arch="vit_debug", num_frames=4, img_size=32, patch_size=8)
    source = build_classifier(ClassifierConfig(encoder, num_classes=5))
    target = build_classifier(ClassifierConfig(encoder, num_classes=5))
    report = load_into_classifier(target, ours_to_hf(source.state_dict(), pretrain=False))
    assert report.fresh == [] and not report.dropped
    video = torch.randn(1, 3, 4, 32, 32)
    torch.testing.assert_close(target.eval()(video), source.eval()(video))
