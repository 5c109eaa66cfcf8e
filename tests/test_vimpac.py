"""VIMPAC: the transformer over tokenizer codes against the paper's definitions (Table 3 sizes, eq. 7-8 embeddings,
eq. 16-17 token head, Table 2 block masks), the mask-then-predict loss on hidden positions only, special ids that
never collide with codes, and pre-training end to end through the entry point: kill -9 and an exact resume, two
ranks with ZeRO-3 and bf16, a checkpoint that fine-tunes, predicts and is probed."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from engine.checkpoint import complete_steps, export_weights
from engine.config import load_config, to_dict
from engine.tasks.tokenizer import TokenizerTrainConfig
from models.masking import MaskConfig, block_union_mask, build_mask_generator
from models.tokenizer import TokenizerConfig, VQTokenizer
from models.vimpac import (
    VIMPAC,
    ContrastiveHeadConfig,
    TokenHead,
    TokenViT,
    VimpacModelConfig,
    special_ids,
    vimpac_encoder,
)

from helpers import CONFIGS, ROOT, SYNTHETIC, entry_command, kill_after_checkpoint, losses, run

TINY_TOKENIZER = TokenizerConfig(channels=[8, 16, 16], codebook_size=32, code_dim=8)  # 8-pixel cells, 32 codes


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> Path:
    """A tokenizer export as run_scripts/tokenizer.py leaves it (weights.pt and config.yaml), untrained."""
    out = tmp_path_factory.mktemp("tokenizer")
    torch.manual_seed(0)
    export_weights(VQTokenizer(TINY_TOKENIZER).state_dict(), out / "weights.pt")
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(TokenizerTrainConfig(model=TINY_TOKENIZER))))
    return out / "weights.pt"


def tiny_model(contrastive: bool = True, **encoder) -> VIMPAC:
    torch.manual_seed(0)
    cfg = VimpacModelConfig(encoder=vimpac_encoder(**{"arch": "vit_debug", "num_frames": 4, "img_size": 32,
                                                       "drop": 0.0, "attn_drop": 0.0, **encoder}),
                            contrastive_head=ContrastiveHeadConfig(layers=2, hidden=16, out_dim=8))
    return VIMPAC(cfg, VQTokenizer(TINY_TOKENIZER).eval(), contrastive=contrastive)


# ---- the model against the paper --------------------------------------------------------------------------------


@pytest.mark.parametrize("arch, extra, paper_millions", [("vimpac_small", {}, 29.4), ("vimpac_base", {}, 119.7),
                                                          ("vimpac_large_half", {"head_dim": 32, "mlp_ratio": 2.0},
                                                           210.1)])
def test_table_3_sizes(arch, extra, paper_millions):
    """VIMPAC's "T,H|W" layers (two attention blocks: time, then height and width) have Table 3's parameter counts;
    full attention has one attention block a layer: Table 13's "TxHxW" Small of 23.1 M."""
    model = TokenViT(vimpac_encoder(arch=arch, layout="t,h|w", norm_layout="post", **extra), vocab_size=8192)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == paper_millions
    full = TokenViT(vimpac_encoder(arch=arch, **extra), vocab_size=8192)
    if arch == "vimpac_small":
        assert round(sum(p.numel() for p in full.parameters()) / 1e6, 1) == 23.1
    if arch == "vimpac_large_half":  # 16 heads of 32: q, k, v of 512 from 1024 wide tokens
        assert full.blocks[0].attn.qkv.weight.shape == (3 * 512, 1024)
        assert full.blocks[0].mlp.fc1.weight.shape == (2048, 1024)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_line_attention_is_eq_12_13_15(axis):
    """Each code attends to [CLS] and the codes of its line along ``axis``; [CLS] attends to every line, and its
    output is the mean over the lines (eq. 15). Against loops over the lines."""
    from models.vimpac import line_attention

    grid, (b, heads, width) = (3, 4, 5), (2, 2, 4)
    q, k, v = (torch.randn(b, heads, 1 + 60, width) for _ in range(3))
    got = line_attention(q, k, v, grid, axis, 0.0)
    index = torch.arange(60).reshape(grid)
    expected, cls = torch.zeros_like(got), []
    others = [a for a in range(3) if a != axis]
    for first in range(grid[others[0]]):
        for second in range(grid[others[1]]):
            where = [slice(None)] * 3
            where[others[0]], where[others[1]] = first, second
            keys = torch.cat([torch.tensor([0]), 1 + index[tuple(where)].flatten()])
            scores = q[:, :, keys] @ k[:, :, keys].transpose(-1, -2) / width**0.5
            out = scores.softmax(-1) @ v[:, :, keys]
            expected[:, :, keys[1:]] = out[:, :, 1:]
            cls.append(out[:, :, 0])
    expected[:, :, 0] = torch.stack(cls).mean(0)
    torch.testing.assert_close(got, expected)


def test_factorized_layers_train_load_and_refuse_pixels():
    from models.convert import load_into_classifier, load_into_encoder
    from models.vit import VisionTransformer, ViTConfig

    model = tiny_model(layout="t,h|w", norm_layout="post")
    video = torch.randn(2, 3, 4, 32, 32)
    loss, _, _ = model(video, block_union_mask(2, (4, 4, 4), 2))
    loss.backward()
    assert all(p.grad is not None for p in model.encoder.blocks.parameters())
    classifier = TokenViT(model.cfg.encoder, 32, num_classes=3, global_pool="cls")
    report = load_into_classifier(classifier, model.state_dict())
    assert report.fresh == ["head.bias", "head.weight"]
    encoder = TokenViT(model.cfg.encoder, 32)
    assert load_into_encoder(encoder, model.state_dict()).norm_source == "none"  # post-norm: no final norm
    torch.testing.assert_close(encoder.eval().forward_features(model.encoder.codes(video)),
                               model.encoder.eval().forward_features(model.encoder.codes(video)))
    with pytest.raises(ValueError, match="is for a transformer over tokenizer codes"):
        VisionTransformer(ViTConfig(arch="vit_debug", layout="t,h|w"))


@pytest.mark.parametrize("grid, blocks, paper", [((5, 16, 16), 5, 14.5), ((5, 32, 32), 6, 15.2),
                                                  ((10, 16, 16), 6, 15.0), ((10, 32, 32), 7, 15.4),
                                                  ((5, 16, 16), 4, 11.9)])
def test_block_unions_hide_table_2s_share(grid, blocks, paper):
    masks = block_union_mask(4000, grid, blocks, generator=torch.Generator().manual_seed(0))
    assert abs(100 * masks.float().mean().item() - paper) < 0.3
    assert len(set(masks.sum(dim=1).tolist())) > 10  # each clip its own count, unlike the fixed-count generators


def test_a_fixed_count_encoder_refuses_block_unions():
    with pytest.raises(ValueError, match="block_count gives every clip its own number"):
        build_mask_generator(MaskConfig(kind="block", block_count=5), (4, 4, 4))
    with pytest.raises(ValueError, match="block_count needs kind='block'"):
        MaskConfig(kind="random", block_count=5)


def test_factorized_positions_are_time_plus_height_plus_width():
    from models.pos_embed import PositionEmbedding

    pos = PositionEmbedding("factorized", (3, 4, 5), 6, cls_token=True)
    table = pos((3, 4, 5)).reshape(3, 4, 5, 6)
    t, i, j = 2, 1, 3
    torch.testing.assert_close(table[t, i, j], pos.temporal[0, t] + pos.height[0, i] + pos.width[0, j])
    assert pos((6, 4, 5)).shape == (1, 6 * 4 * 5, 6)  # resampled along time for a longer clip
    assert pos.cls is not None


def test_embedding_is_eq_7_and_special_ids_never_collide_with_codes():
    model = tiny_model()
    encoder = model.encoder.eval()
    vocab = encoder.vocab_size
    mask_id, pad_id = special_ids(vocab)
    assert {mask_id, pad_id} == {vocab, vocab + 1} and encoder.token_embed.weight.shape[0] == vocab + 2
    video = torch.randn(2, 3, 4, 32, 32)
    codes = encoder.codes(video)
    assert codes.shape == (2, 4, 4, 4) and int(codes.max()) < vocab  # a tokenizer's codes are below the special ids
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[0, 5] = mask[1, 60] = True
    ids = codes.flatten(1).masked_fill(mask, mask_id)
    pos = encoder.pos_embed((4, 4, 4))
    expected = torch.cat([(encoder.cls_token + encoder.pos_embed.cls).expand(2, -1, -1),
                          encoder.token_embed.weight[ids] + pos], dim=1)
    torch.testing.assert_close(encoder.embed(codes, mask), encoder.embed_norm(expected))  # LN(embed + pos), eq. 7
    # the token head has a logit per code and none for [MASK] or [PAD]
    logits = model.token_head(torch.randn(3, encoder.embed_dim), encoder.token_embed.weight)
    assert logits.shape == (3, vocab)


def test_token_head_is_eq_16_17_with_the_embedding_tied():
    head = TokenHead(8, 5, 1e-6)
    embedding = torch.randn(7, 8)  # 5 codes + 2 special ids
    hidden = torch.randn(3, 8)
    u = F.layer_norm(F.gelu(hidden @ head.dense.weight.T + head.dense.bias), (8,), head.norm.weight, head.norm.bias,
                     1e-6)
    torch.testing.assert_close(head(hidden, embedding), u @ embedding[:5].T + head.bias)


def test_the_mask_loss_scores_the_hidden_positions_only():
    model = tiny_model().eval()
    video = torch.randn(3, 3, 4, 32, 32)
    mask = block_union_mask(3, (4, 4, 4), 2, generator=torch.Generator().manual_seed(1))
    loss, accuracy, features = model(video, mask)
    codes = model.encoder.codes(video).flatten(1)
    hidden = model.encoder.forward_features(codes.reshape(3, 4, 4, 4), mask)[:, 1:]
    logits = model.token_head(hidden, model.encoder.token_embed.weight)  # every position, then pick the hidden ones
    torch.testing.assert_close(loss, F.cross_entropy(logits[mask], codes[mask]))
    assert accuracy == (logits[mask].argmax(-1) == codes[mask]).float().mean()
    assert features.shape == (3, 8)
    # a visible code's own prediction is not scored: the gradient of the head's bias only has the hidden targets
    model.zero_grad()
    loss.backward()
    visible_only = set(codes[~mask].tolist()) - set(codes[mask].tolist())
    probabilities = logits[mask].softmax(-1).mean(0)
    for code in visible_only:
        assert model.token_head.bias.grad[code] == pytest.approx(probabilities[code].item(), abs=1e-6)


def test_post_norm_blocks_follow_the_residual_sums():
    model = tiny_model(norm_layout="post")
    block = model.encoder.blocks[0].eval()
    x = torch.randn(2, 5, 64)
    y = block.norm1(x + block.attn(x))
    torch.testing.assert_close(block(x), block.norm2(y + block.mlp(y)))
    assert isinstance(model.encoder.norm, torch.nn.Identity)  # the last block ends on a norm


def test_linear_lr_decay():
    from engine.optim import cosine_schedule

    assert cosine_schedule(0, 100, 10, 1.0, 0.0, 0.0, shape="linear") == 0.0
    assert cosine_schedule(10, 100, 10, 1.0, 0.0, 0.0, shape="linear") == 1.0
    assert cosine_schedule(55, 100, 10, 1.0, 0.0, 0.0, shape="linear") == pytest.approx(0.5)
    assert cosine_schedule(200, 100, 10, 1.0, 0.0, 0.0, shape="linear") == 0.0


def test_two_clips_of_a_video_start_within_the_bound():
    from datasets.sampling import repeated_dense_indices

    rng = random.Random(0)
    for _ in range(200):
        first, second = repeated_dense_indices(300, 5, 4, 2, rng, max_distance=20)
        assert abs(first[0] - second[0]) <= 20 and 0 <= second[0] <= 300 - 17
    far = [abs(a[0] - b[0]) for a, b in (repeated_dense_indices(300, 5, 4, 2, rng) for _ in range(200))]
    assert max(far) > 20  # unbounded by default


def test_the_config_says_what_is_wrong(tokenizer_path):
    from engine.tasks.vimpac import VimpacConfig

    with pytest.raises(Exception, match="pairs two clips of each video: set batch.repeats=2"):
        load_config(VimpacConfig, None, ["batch.repeats=1"])
    load_config(VimpacConfig, None, ["batch.repeats=1", "contrastive.weight=0"])
    with pytest.raises(ValueError, match="set encoder.tubelet_size=1 and encoder.patch_size=8"):
        TokenViT(vimpac_encoder(arch="vit_debug", patch_size=16), 32, tokenizer=VQTokenizer(TINY_TOKENIZER))


# ---- end to end ------------------------------------------------------------------------------------------------


def command(out: Path, data_root: Path, tokenizer: Path, *overrides: str, launcher=(sys.executable,)) -> list[str]:
    return entry_command("vimpac.py", CONFIGS / "vimpac" / "tiny_cpu.yaml", out, f"data.root={data_root}",
            f"data.synthetic={SYNTHETIC}", f"model.tokenizer={tokenizer}",
            "model.encoder.num_frames=4", "model.encoder.img_size=32", "mask.block_count=2", "batch.micro_batch=4",
            "batch.num_workers=0", "optim.epochs=2", "optim.warmup_epochs=1", "run.log_every=1",
            "run.save_every_epochs=1", *overrides, launcher=launcher)


@pytest.mark.e2e
def test_pretraining_resumes_exactly_after_kill_9(tmp_path, data_root, tokenizer_path):
    reference = tmp_path / "reference"
    run(command(reference, data_root, tokenizer_path, "run.save_every_steps=3"))
    records = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert {"mask_loss", "mask_accuracy", "contrastive_loss"} <= records[-1].keys()
    first = records[0]
    assert first["loss"] == pytest.approx(first["mask_loss"] + 0.2 * first["contrastive_loss"], rel=1e-5)
    out = tmp_path / "killed"
    process = subprocess.Popen(command(out, data_root, tokenizer_path, "run.save_every_steps=3"), cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    kill_after_checkpoint(process, out, 9, 10)
    assert max(complete_steps(out)) % 8, "not killed mid-epoch"
    run(command(out, data_root, tokenizer_path, "run.save_every_steps=3"))
    assert losses(out) == losses(reference)  # fp32 on CPU: the same losses, step by step
    a, b = (torch.load(path / "weights.pt", weights_only=True) for path in (reference, out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "contrastive_head.1.running_mean" in a and not any("quantizer" in k for k in a)


@pytest.mark.e2e
def test_two_ranks_zero3_bf16_with_every_parameter_partitioned(tmp_path, data_root, tokenizer_path):
    """ZeRO-3 keeps parameters under its persistence threshold whole; at 0 every one is partitioned, so a parameter
    read outside its module's forward (the tied token-head weight, the [CLS] vectors) would be found empty."""
    template = json.loads((ROOT / "ds_configs" / "zero3_bf16.json").read_text())
    template["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp_path / "zero3_partitioned.json").write_text(json.dumps(template))
    out = tmp_path / "two"
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    run(command(out, data_root, tokenizer_path, "optim.epochs=1", f"ds.template={tmp_path / 'zero3_partitioned.json'}",
                launcher=torchrun))
    assert yaml.safe_load((out / "derived.yaml").read_text())["world_size"] == 2
    weights = torch.load(out / "weights.pt", weights_only=True)
    assert all(torch.isfinite(t.float()).all() for t in weights.values())
    assert all(0 < loss < 10 for loss in losses(out).values())


@pytest.mark.e2e
def test_a_vimpac_checkpoint_fine_tunes_predicts_and_is_probed(tmp_path, data_root, tokenizer_path):
    pretrain = tmp_path / "pretrain"
    run(command(pretrain, data_root, tokenizer_path, "optim.epochs=1", "contrastive.weight=0", "batch.repeats=1",
                "knn.every_epochs=1"))
    logged = [json.loads(line) for line in (pretrain / "metrics.jsonl").read_text().splitlines()]
    assert [0 <= r["knn_top1"] <= 1 for r in logged if "knn_top1" in r] == [True]  # VIMPAC's k-NN monitor
    assert "contrastive_loss" not in logged[-2] and "mask_accuracy" in logged[-2]
    finetune = tmp_path / "finetune"
    result = run([sys.executable, str(ROOT / "run_scripts" / "finetune.py"), "--config",
                  str(ROOT / "run_scripts" / "configs" / "finetune" / "vimpac_tiny_cpu.yaml"),
                  f"run.output_dir={finetune}", f"data.root={data_root}", f"data.synthetic={SYNTHETIC}",
                  f"model.tokenizer={tokenizer_path}", f"model.init={pretrain / 'weights.pt'}", "model.num_classes=4",
                  "data.num_classes=4", "model.encoder.num_frames=4", "model.encoder.img_size=32",
                  "data.eval_augment.short_side=32", "batch.micro_batch=4", "batch.num_workers=0", "optim.epochs=1",
                  "eval.every_epochs=1", "data.test_temporal_views=1"])
    assert "dropped: token_head.bias" in result.stderr and "fresh: head.bias, head.weight" in result.stderr
    tested = json.loads((finetune / "test_results.json").read_text())
    assert tested["model"]["num_scored"] == tested["model"]["num_videos"] > 0
    video = Path(data_root) / (Path(data_root) / "val.csv").read_text().split()[0]
    predicted = subprocess.run([sys.executable, str(ROOT / "run_scripts" / "predict.py"), "--weights",
                                str(finetune / "weights.pt"), "--video", str(video), "--topk", "2"],
                               cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    assert len([line for line in predicted.stdout.splitlines() if line.strip()]) >= 2
    # the probe's frozen encoder reads the pre-trained one: its cls feature is the encoder's [CLS] after the norm
    from engine.frozen import load_trained_tokenizer
    from models.probe import FeatureEncoder

    encoder = FeatureEncoder(vimpac_encoder(arch="vit_debug", num_frames=4, img_size=32), last_k=1,
                             tokenizer=load_trained_tokenizer(str(tokenizer_path))).eval()
    report = encoder.load(torch.load(pretrain / "weights.pt", weights_only=True))
    assert report.norm_source == "norm" and not report.fresh
    clip = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        pooled = encoder.pooled(clip, ["cls", "mean"])
        torch.testing.assert_close(pooled[:, 0], encoder.tokens(clip)[:, 0])


def test_the_256_pixel_continuation_starts_from_the_128_pixel_model():
    small, large = tiny_model(), tiny_model(img_size=64)
    weights = small.state_dict()
    resampled = large.load_pretraining(weights)
    assert resampled == ["encoder.pos_embed.height", "encoder.pos_embed.width"]
    assert torch.equal(large.encoder.blocks[0].attn.qkv.weight, small.encoder.blocks[0].attn.qkv.weight)
    assert large.encoder.pos_embed.height.shape[1] == 8
    # a mask-only model continues from a contrastive one without its head; any other mismatch is refused
    assert tiny_model(contrastive=False).load_pretraining(weights) == []
    with pytest.raises(RuntimeError):
        tiny_model(depth=3).load_pretraining(weights)


@pytest.mark.e2e
def test_the_entry_point_names_a_missing_tokenizer(tmp_path, data_root):
    result = subprocess.run(command(tmp_path / "run", data_root, Path("x")) + ['model.tokenizer=""'], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "model.tokenizer is not set" in result.stderr
    result = subprocess.run(command(tmp_path / "run", data_root, tmp_path / "none.pt"), cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "model.tokenizer=" in result.stderr and "config.yaml beside it" in result.stderr
