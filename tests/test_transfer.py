"""Fine-tuning from the weight files users have: read by ``engine.checkpoint.read_checkpoint`` (nothing pickled
runs) and loaded by ``models.convert.load_into_classifier``: official VideoMAE / V2 ``.pth`` files, Hugging Face
``save_pretrained`` directories, our exported weights for other frame counts and sizes, files that are refused.

DeepSpeed step directories written by a real run are covered by tests/test_pretrain.py (through visualize.py).
"""

import argparse
import json
import pickle
import re

import numpy as np
import pytest
import torch

from engine.checkpoint import MARKER, UnsafeCheckpointError, export_weights, read_checkpoint
from models.convert import load_into_classifier, load_into_pretrain, official_to_pretrain
from models.pos_embed import resample_spatial, resample_temporal
from models.videomae import DecoderConfig, PretrainModelConfig, VideoMAE
from models.vit import ClassifierConfig, ViTConfig, build_classifier

HEAD_KEYS = ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]


def encoder(**overrides) -> ViTConfig:
    return ViTConfig(**{"arch": "vit_debug", "num_frames": 8, "img_size": 32, "patch_size": 8, **overrides})


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (biases and q/v biases included), so that a mis-mapped tensor shows."""
    params = list(model.parameters())
    size = sum(p.numel() for p in params)
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(0.1 * torch.randn(size, generator=torch.Generator().manual_seed(seed)),
                                            params)
    return model.eval()


def pretraining_model(**encoder_overrides) -> VideoMAE:
    return randomized(VideoMAE(PretrainModelConfig(encoder(**encoder_overrides), DecoderConfig(depth=1))))


def classifier(num_classes: int = 5, global_pool: str = "mean", **encoder_overrides) -> torch.nn.Module:
    return build_classifier(ClassifierConfig(encoder(**encoder_overrides), num_classes, global_pool)).eval()


def optimizer_state(model: torch.nn.Module) -> dict:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    return optimizer.state_dict()


def official_args(**fields) -> argparse.Namespace:
    """What VideoMAE's run scripts pickle under ``args`` (abridged)."""
    return argparse.Namespace(model="pretrain_videomae_base_patch16_224", mask_type="tube", mask_ratio=0.9,
                              window_size=(4, 4, 4), lr=1.5e-4, output_dir="/data/out", **fields)


# ---- official VideoMAE / VideoMAE V2 files -------------------------------------------------------------------


def test_official_videomae_pretraining_checkpoint(tmp_path):
    source = pretraining_model()
    path = tmp_path / "checkpoint-799.pth"
    # As VideoMAE's utils.save_model writes it.
    torch.save({"model": source.state_dict(), "optimizer": optimizer_state(source), "epoch": 799,
                "scaler": torch.amp.GradScaler("cpu").state_dict(), "args": official_args()}, path)
    with pytest.raises(pickle.UnpicklingError, match="argparse.Namespace"):  # the allow-list makes it readable
        torch.load(path, weights_only=True)

    checkpoint = read_checkpoint(path)
    assert checkpoint["epoch"] == 799 and checkpoint["args"].mask_type == "tube"
    target = classifier()
    report = load_into_classifier(target, checkpoint)

    sd = source.state_dict()
    pretrain_only = {k for k in sd if k.startswith("decoder.")} | {"encoder_to_decoder.weight", "mask_token"}
    # Mean pooling starts a fresh fc_norm, so the encoder's final norm goes with the decoder (as in VideoMAE).
    assert set(report.dropped) == pretrain_only | {"encoder.norm.weight", "encoder.norm.bias"}
    assert report.fresh == HEAD_KEYS and not report.resampled
    loaded = target.state_dict()
    for key in report.loaded:
        assert torch.equal(loaded[key], sd[f"encoder.{key}"]), key
    assert len(report.loaded) == len([k for k in sd if k.startswith("encoder.")]) - 2


def test_videomae_v2_finetuned_checkpoint_with_another_head(tmp_path):
    finetuned = randomized(classifier(num_classes=710))
    path = tmp_path / "vit_g_hybrid_pt_1200e_k710_ft.pth"
    torch.save({"module": {f"backbone.{k}": v for k, v in finetuned.state_dict().items()}, "epoch": 34,
                "args": official_args(nb_classes=710)}, path)
    target = classifier(num_classes=7)
    report = load_into_classifier(target, read_checkpoint(path))
    assert sorted(report.dropped) == ["head.bias", "head.weight"]
    assert report.fresh == ["head.bias", "head.weight"]
    for key, value in target.state_dict().items():
        if not key.startswith("head."):
            assert torch.equal(value, finetuned.state_dict()[key]), key


def test_official_finetuned_checkpoint_without_mean_pooling(tmp_path):
    """Official VideoMAE fine-tuned with use_mean_pooling=False keeps its final ``norm`` and feeds the head the
    first token: it loads as trained into global_pool='first', and never into mean pooling with its head kept."""
    finetuned = randomized(classifier(global_pool="first"))
    assert "fc_norm.weight" not in finetuned.state_dict()
    path = tmp_path / "checkpoint-best.pth"
    torch.save({"module": finetuned.state_dict(), "epoch": 29, "args": official_args(use_mean_pooling=False)}, path)
    with pytest.raises(ValueError, match=r"one token after the final LayerNorm.*model\.global_pool=first"):
        load_into_classifier(classifier(), read_checkpoint(path))
    target = classifier(global_pool="first")
    report = load_into_classifier(target, read_checkpoint(path))
    assert report.dropped == [] and report.fresh == []
    video = torch.randn(2, 3, 8, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(target(video), finetuned(video))
        # The first patch token after the final norm, as in the official forward_features.
        expected = finetuned.head(finetuned.forward_features(video)[:, 0])
    torch.testing.assert_close(target(video), expected)


def test_numpy_scalars_are_allowed(tmp_path):
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": classifier().state_dict(), "epoch": np.int64(3), "max_accuracy": np.float64(81.5),
                "scale": np.float32(2.0)}, path)
    checkpoint = read_checkpoint(path)
    assert (checkpoint["epoch"], checkpoint["max_accuracy"], checkpoint["scale"]) == (3, 81.5, 2.0)
    assert isinstance(checkpoint["max_accuracy"], np.float64)


# ---- official VideoMAE pre-training with LayerScale (the official code builds encoder and decoder with init_values)


def layer_scale_model(decoder: float = 0.0, encoder_: float = 0.0) -> VideoMAE:
    cfg = PretrainModelConfig(encoder(layer_scale_init=encoder_), DecoderConfig(depth=2, layer_scale_init=decoder))
    return VideoMAE(cfg).eval()


def official_layer_scale_state_dict(parts=("decoder",)) -> dict:
    """An official pre-training state dict whose ``parts`` blocks have LayerScale, written without our option: the
    weights of a model without it plus ``<part>.blocks.N.gamma_1``/``gamma_2``, random and nowhere near 1."""
    sd = randomized(layer_scale_model()).state_dict()
    g = torch.Generator().manual_seed(7)
    for key in list(sd):
        block = re.fullmatch(rf"((?:{'|'.join(parts)})\.blocks\.\d+)\.norm1\.weight", key)
        if block:
            for name in ("gamma_1", "gamma_2"):
                sd[f"{block[1]}.{name}"] = 0.1 + 0.4 * torch.rand(sd[key].shape, generator=g)
    return sd


def fold_layer_scale(sd: dict) -> dict:
    """The same network without LayerScale: the official block computes ``x + gamma_1 * attn(norm1(x))`` and
    ``x + gamma_2 * mlp(norm2(x))``, so gamma_1 folds into the attention's output projection and gamma_2 into
    the MLP's last layer."""
    out = {k: v for k, v in sd.items() if not k.endswith((".gamma_1", ".gamma_2"))}
    for key, gamma in sd.items():
        if key.endswith((".gamma_1", ".gamma_2")):
            block, name = key.rsplit(".", 1)
            layer = f"{block}.{'attn.proj' if name == 'gamma_1' else 'mlp.fc2'}"
            out[f"{layer}.weight"] = gamma[:, None] * sd[f"{layer}.weight"]
            out[f"{layer}.bias"] = gamma * sd[f"{layer}.bias"]
    return out


def clip_and_mask(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A clip for ``encoder()`` (64 tokens) and a mask hiding 48 tokens of each sample."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.stack([torch.randperm(64, generator=g) < 48 for _ in range(2)])
    return torch.randn(2, 3, 8, 32, 32, generator=g), mask


def test_official_pretraining_checkpoint_with_decoder_layer_scale(tmp_path):
    sd = official_layer_scale_state_dict()
    path = tmp_path / "checkpoint-1599.pth"
    torch.save({"model": sd, "epoch": 1599, "args": official_args(init_values=0.1)}, path)
    checkpoint = read_checkpoint(path)

    converted, report = official_to_pretrain(checkpoint)  # the official names are ours: carried as they are
    assert converted.keys() == sd.keys() and all(torch.equal(converted[k], v) for k, v in sd.items())
    assert report.dropped == []
    with pytest.raises(ValueError, match=r"decoder\.blocks\.N have LayerScale.*set model\.decoder\.layer_scale_init"):
        load_into_pretrain(layer_scale_model(), checkpoint)  # the default decoder has none
    model = layer_scale_model(decoder=0.1)
    load_into_pretrain(model, checkpoint)
    assert torch.equal(model.decoder.blocks[1].gamma_2, sd["decoder.blocks.1.gamma_2"])

    folded, without = layer_scale_model(), layer_scale_model()
    folded.load_state_dict(fold_layer_scale(sd))
    without.load_state_dict({k: v for k, v in sd.items() if "gamma" not in k})
    video, mask = clip_and_mask()
    with torch.no_grad():
        loss, pred, _ = model(video, mask)
        expected_loss, expected, _ = folded(video, mask)
        _, plain, _ = without(video, mask)
    torch.testing.assert_close(pred, expected)
    torch.testing.assert_close(loss, expected_loss)
    assert (pred - plain).abs().max() > 100 * (pred - expected).abs().max() + 1e-3  # the gammas matter

    # Fine-tuning from it: the decoder's gammas go with the rest of the decoder, listed.
    report = load_into_classifier(classifier(), checkpoint)
    assert {"decoder.blocks.0.gamma_1", "decoder.blocks.1.gamma_2"} <= set(report.dropped)


def test_layer_scale_mismatches_name_the_config_fields():
    both = official_layer_scale_state_dict(parts=("encoder", "decoder"))
    with pytest.raises(ValueError) as error:
        load_into_pretrain(layer_scale_model(), both)
    assert "model.encoder.layer_scale_init" in str(error.value) and "model.decoder.layer_scale_init" in str(error.value)
    load_into_pretrain(layer_scale_model(decoder=0.1, encoder_=0.1), both)
    with pytest.raises(ValueError, match=r"blocks\.N have LayerScale .*set model\.encoder\.layer_scale_init"):
        load_into_classifier(classifier(), both)  # the encoder's gammas need a classifier with LayerScale too
    load_into_classifier(classifier(layer_scale_init=0.1), both)

    plain = randomized(layer_scale_model()).state_dict()
    assert not any("gamma" in k for k in plain)  # LayerScale stays off by default
    with pytest.raises(ValueError, match=r"the model's decoder\.blocks\.N have LayerScale .*model\.decoder\."
                                         r"layer_scale_init=0"):
        load_into_pretrain(layer_scale_model(decoder=0.1), plain)


# ---- files that are refused ----------------------------------------------------------------------------------


def leave_a_mark(path):
    open(path, "w").close()


class Payload:
    """Unpickling an instance calls ``leave_a_mark``: code chosen by the file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return leave_a_mark, (str(self.marker),)


class Record:
    """A plain object: harmless, but not on the allow-list."""


@pytest.mark.parametrize("payload, named", [("reduce", "leave_a_mark"), ("object", "Record")])
def test_files_needing_other_globals_are_refused_without_running_them(tmp_path, payload, named):
    marker = tmp_path / "ran"
    path = tmp_path / "weights.pt"
    torch.save({"model": classifier().state_dict(), "extra": Payload(marker) if payload == "reduce" else Record()},
               path)
    with pytest.raises(UnsafeCheckpointError) as error:
        read_checkpoint(path)
    message = str(error.value)
    assert f"test_transfer.{named}" in message and str(path) in message
    assert "would run code from the pickle" in message and "argparse.Namespace" in message  # what is allowed
    assert not marker.exists()


def test_missing_and_unrecognised_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere.pth")):
        read_checkpoint(tmp_path / "nowhere.pth")
    run = tmp_path / "run"
    run.mkdir()
    export_weights(classifier().state_dict(), run / "weights.pt")
    with pytest.raises(ValueError, match=r"neither a DeepSpeed checkpoint .*did you mean .*weights\.pt"):
        read_checkpoint(run)


# ---- DeepSpeed directories (the layout DeepSpeed 0.19 writes; real runs in test_pretrain.py) -----------------


def test_zero0_step_directory_and_an_unfinished_one(tmp_path):
    source = classifier()
    step = tmp_path / "checkpoints" / "step_5"
    step.mkdir(parents=True)
    # ZeRO stage 0 keeps the whole module in its model-states file and writes no optimizer partitions.
    torch.save({"module": {k: v.bfloat16() for k, v in source.state_dict().items()}, "optimizer": None,
                "ds_version": "0.19.8", "step": 5}, step / "mp_rank_00_model_states.pt")
    with pytest.raises(ValueError, match=f"{step} has no {MARKER} marker"):
        read_checkpoint(step)
    (step / MARKER).write_text(json.dumps({"step": 5}))
    weights = read_checkpoint(step)
    assert weights.keys() == source.state_dict().keys()
    for key, value in weights.items():
        assert value.dtype == torch.float32 and torch.equal(value, source.state_dict()[key].bfloat16().float())


# ---- Hugging Face transformers -------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
@pytest.mark.parametrize("whole_directory", [True, False])
def test_hugging_face_checkpoint_gives_the_same_logits(tmp_path, weights, whole_directory):
    pytest.importorskip("transformers")
    from test_convert import assert_close, hf_classifier, ours_classifier, to_hf, to_v4_naming, video_and_mask

    hf = hf_classifier(seed=3)
    hf.save_pretrained(tmp_path)  # config.json + model.safetensors
    if weights == "pytorch_model.bin":  # what transformers 4 wrote, as many Hub checkpoints are: v4 names
        (tmp_path / "model.safetensors").unlink()
        torch.save(to_v4_naming(hf.state_dict()), tmp_path / weights)
    ours = ours_classifier()
    report = load_into_classifier(ours, read_checkpoint(tmp_path if whole_directory else tmp_path / weights))
    assert report.fresh == [] and report.dropped == [] and not report.resampled
    video, _ = video_and_mask()
    with torch.no_grad():
        assert_close(ours(video), hf(pixel_values=to_hf(video)).logits)


def test_sharded_hugging_face_directory(tmp_path):
    pytest.importorskip("transformers")
    from test_convert import hf_classifier

    hf = hf_classifier()
    hf.save_pretrained(tmp_path / "whole")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    whole, sharded = read_checkpoint(tmp_path / "whole"), read_checkpoint(tmp_path / "sharded")
    assert whole.keys() == sharded.keys() and all(torch.equal(whole[k], sharded[k]) for k in whole)


# ---- fine-tuning geometry ------------------------------------------------------------------------------------


@pytest.mark.parametrize("pos, cls_token, frames, size", [
    ("sincos", False, 8, 32), ("sincos", False, 32, 32),
    ("separable", False, 8, 32), ("separable", False, 32, 48), ("separable", True, 8, 48),
])
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_exported_16_frame_weights_fine_tune_at_other_frame_counts_and_sizes(tmp_path, pos, cls_token, frames,
                                                                             size, suffix):
    source = pretraining_model(num_frames=16, pos_embed=pos, cls_token=cls_token)
    path = export_weights(source.state_dict(), tmp_path / f"weights{suffix}")
    pool = "cls" if cls_token else "mean"
    target = classifier(global_pool=pool, num_frames=frames, img_size=size, pos_embed=pos, cls_token=cls_token)
    report = load_into_classifier(target, read_checkpoint(path))

    assert report.fresh == (["head.bias", "head.weight"] if cls_token else HEAD_KEYS)
    grid = target.cfg.grid
    if pos == "separable":
        expected = ["pos_embed.temporal"] + (["pos_embed.spatial"] if size != 32 else [])
        assert sorted(report.resampled) == sorted(expected)
        table = source.encoder.pos_embed
        assert torch.equal(target.pos_embed.temporal, resample_temporal(table.temporal, grid[0]))
        assert target.pos_embed.temporal.shape == (1, frames // 2, 64)
        spatial = resample_spatial(table.spatial, grid[1:]) if size != 32 else table.spatial
        assert torch.equal(target.pos_embed.spatial, spatial)
        if cls_token:
            assert torch.equal(target.pos_embed.cls, table.cls) and torch.equal(target.cls_token,
                                                                                 source.encoder.cls_token)
    else:
        assert report.resampled == []  # the fixed table is rebuilt by the model for its own grid
    assert torch.equal(target.blocks[1].attn.qkv.weight, source.encoder.blocks[1].attn.qkv.weight)
    with torch.no_grad():
        logits = target(torch.randn(2, 3, frames, size, size))
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()
