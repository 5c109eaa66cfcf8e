"""Frozen-encoder probes: pooled features against the models they come from, the feature cache (a direct forward,
resume after a crash, refusal of other settings, unreadable videos), the grid of heads against heads alone, k-NN
and per-video scoring against independent references, the choice on validation, and the entry point end to end
(a stop during extraction and its resume, one rank against two, a head trained alone against the grid's)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from datasets.transforms import AugmentConfig
from datasets.video_dataset import AugmentedViews, DataConfig, EvalClips, TrainClips, load_records, model_input
from engine.config import ConfigError
from engine.eval.features import FeatureConfig, FeatureSplit, extract_split, shard_path
from engine.eval.knn import KNN, KNNConfig
from engine.eval.multiview import ScoreAccumulator, summarize
from engine.eval.report import choose_on_validation
from engine.frozen import ProbeModelConfig, build_feature_encoder
from engine.optim import OptimConfig, optimizer_over
from engine.tasks.probe import head_param_groups, score_videos
from models.probe import DEFAULT_POOLS as POOLS  # the pooled features of an encoder without a cls token
from models.probe import AttentiveProbeGrid, FeatureEncoder, HeadSpec, LinearHeadGrid, head_grid, per_head_loss
from models.videomae import PretrainModelConfig, VideoMAE
from models.vit import ClassifierConfig, ViTConfig, build_classifier

from helpers import CONFIGS, ROOT, SYNTHETIC, entry_command, run

SCRIPT = ROOT / "run_scripts" / "probe.py"
RECIPE = CONFIGS / "probe" / "tiny_cpu.yaml"
TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29653")


def tiny_vit(**overrides) -> ViTConfig:
    return ViTConfig(**{"arch": "vit_debug", "num_frames": 4, "img_size": 32, "patch_size": 8, **overrides})


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (LayerNorms too), so that a wrong copy cannot pass for a right one."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return model


def data_config(root: Path, **overrides) -> DataConfig:
    overrides = {"train_list": str(root / "train.csv"), "val_list": str(root / "val.csv"),
                 "eval_augment": AugmentConfig(kind="eval", short_side=32, num_spatial_views=3), **overrides}
    return DataConfig(root=str(root), num_classes=4, test_temporal_views=2, sampling_rate=2,
                      train_augment=AugmentConfig(kind="multi_scale", flip=False), **overrides)


# ---- pooled features -------------------------------------------------------------------------------------------


def test_pooled_features_of_a_pretraining_checkpoint_are_its_encoder_tokens_averaged():
    pretrain = randomize(VideoMAE(PretrainModelConfig(tiny_vit())))
    encoder = FeatureEncoder(tiny_vit(), last_k=2)
    report = encoder.load({"model": pretrain.state_dict()})
    assert report.norm_source == "norm" and encoder.fc_norm is None
    video = torch.randn(3, 3, 4, 32, 32)
    outputs = []
    hooks = [b.register_forward_hook(lambda m, i, o: outputs.append(o)) for b in pretrain.encoder.blocks]
    with torch.no_grad():
        tokens = pretrain.encoder.forward_features(video)  # VideoMAE's own encoder: blocks then its final norm
        pooled = encoder.pooled(video)
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(pooled[:, POOLS.index("norm_mean")], tokens.mean(dim=1))
    torch.testing.assert_close(pooled[:, POOLS.index("mean")], outputs[-1].mean(dim=1))
    torch.testing.assert_close(pooled[:, POOLS.index("last_k_mean")],
                               (outputs[-1].mean(dim=1) + outputs[-2].mean(dim=1)) / 2)
    torch.testing.assert_close(encoder.tokens(video), tokens)


def test_norm_mean_of_a_mean_pooling_classifier_is_the_feature_its_head_was_trained_on():
    classifier = randomize(build_classifier(ClassifierConfig(tiny_vit(), num_classes=7, global_pool="mean")))
    encoder = FeatureEncoder(tiny_vit(), last_k=1)
    report = encoder.load(classifier.state_dict())
    assert report.norm_source == "fresh" and encoder.fc_norm is not None
    video = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        expected = classifier.forward_head(classifier.forward_features(video), pre_logits=True)
        pooled = encoder.pooled(video, ["norm_mean", "mean", "last_k_mean"])
    torch.testing.assert_close(pooled[:, 0], expected)
    torch.testing.assert_close(pooled[:, 1], pooled[:, 2])  # k = 1: the last block alone


def test_a_checkpoint_without_an_encoder_or_of_another_geometry_is_refused(tmp_path):
    heads = LinearHeadGrid(64, 4, POOLS, head_grid(POOLS, [0.1], [0.0]))
    torch.save(heads.state_dict(), tmp_path / "heads.pt")
    with pytest.raises(ConfigError, match=r"heads.pt holds no video ViT encoder \(no patch embedding"):
        build_feature_encoder(ProbeModelConfig(encoder=tiny_vit(), init=str(tmp_path / "heads.pt")), 1)
    narrow = VideoMAE(PretrainModelConfig(tiny_vit(embed_dim=32)))
    torch.save(narrow.state_dict(), tmp_path / "narrow.pt")
    with pytest.raises(ConfigError, match=r"narrow.pt does not fit model.encoder \(vit_debug, 4x32².*do not fit"):
        build_feature_encoder(ProbeModelConfig(encoder=tiny_vit(), init=str(tmp_path / "narrow.pt")), 1)
    other_patch = VideoMAE(PretrainModelConfig(tiny_vit(patch_size=16)))
    torch.save(other_patch.state_dict(), tmp_path / "patch16.pt")
    with pytest.raises(ConfigError, match="patch16.pt does not fit model.encoder"):
        build_feature_encoder(ProbeModelConfig(encoder=tiny_vit(), init=str(tmp_path / "patch16.pt")), 1)


# ---- the grid of heads -----------------------------------------------------------------------------------------


def test_the_grid_computes_each_head_on_its_standardized_feature():
    specs = head_grid(["mean", "last_k_mean"], [0.1, 1.0], [0.0, 1e-3])
    grid = LinearHeadGrid(16, 5, POOLS, specs, seed=3)
    with torch.no_grad():
        for head in grid.heads:
            head.weight.normal_()
            head.bias.normal_()
    grid.set_standardization(torch.randn(3, 16), torch.rand(3, 16) + 0.5)
    x = torch.randn(6, 3, 16)
    logits = grid(x)
    assert logits.shape == (6, 8, 5)
    for h, spec in enumerate(specs):
        p = POOLS.index(spec.pool)
        standardized = (x[:, p] - grid.feature_mean[p]) / torch.sqrt(grid.feature_std[p] ** 2)
        torch.testing.assert_close(logits[:, h], grid.heads[h](standardized))
        state = grid.head_state(h)
        torch.testing.assert_close(logits[:, h], (x[:, p] - state["feature_mean"]) / state["feature_std"]
                                   @ state["weight"].T + state["bias"])


def test_heads_must_come_pool_by_pool():
    with pytest.raises(ValueError, match="pool by pool"):
        LinearHeadGrid(8, 3, POOLS, [HeadSpec("mean", 0.1, 0), HeadSpec("norm_mean", 0.1, 0), HeadSpec("mean", 1, 0)])
    with pytest.raises(ValueError, match="not among"):
        LinearHeadGrid(8, 3, ["mean"], [HeadSpec("norm_mean", 0.1, 0)])


def _train(specs: list[HeadSpec], optim: OptimConfig, x: torch.Tensor, y: torch.Tensor) -> LinearHeadGrid:
    """A few steps of the probe's optimizer (its groups as LinearProbeTask builds them) on fixed batches."""
    grid = LinearHeadGrid(x.shape[-1], 4, POOLS, specs, seed=0)
    grid.set_standardization(x.mean(dim=0), x.var(dim=0))
    optimizer = optimizer_over(head_param_groups(grid, specs, optim.blr), optim)
    for step in range(6):
        for group in optimizer.param_groups:
            group["lr"] = 0.2 * group["lr_scale"]
            group["weight_decay"] = group.get("fixed_weight_decay", 0.0)
        batch = slice(8 * (step % 3), 8 * (step % 3) + 8)
        optimizer.zero_grad()
        per_head_loss(grid(x[batch]), y[batch]).backward()
        optimizer.step()
    return grid


@pytest.mark.parametrize("name", ["sgd", "lars"])
def test_a_head_trained_in_the_grid_is_the_head_trained_alone(name):
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 3, 16, generator=generator), torch.randint(0, 4, (24,), generator=generator)
    optim = OptimConfig(name=name, blr=0.1, weight_decay=0.0, momentum=0.9, min_lr=0, warmup_lr=0)
    specs = head_grid(POOLS, [0.05, 0.4], [0.0, 0.01])
    together = _train(specs, optim, x, y)
    for h in (0, 5, 11):
        alone = _train([specs[h]], optim, x, y)
        torch.testing.assert_close(together.heads[h].weight, alone.heads[0].weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(together.heads[h].bias, alone.heads[0].bias, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(together.heads[0].weight, together.heads[11].weight)  # the grid's heads differ


def test_attentive_probes_share_one_frozen_forward():
    encoder = FeatureEncoder(tiny_vit(), last_k=1)
    grid = AttentiveProbeGrid(encoder, num_probes=3, num_classes=5).train()
    assert not encoder.training  # frozen: always in eval mode
    video = torch.randn(2, 3, 4, 32, 32)
    logits = grid(video)
    assert logits.shape == (2, 3, 5)
    torch.testing.assert_close(logits[:, 0], logits[:, 2])  # the same start
    logits.sum().backward()
    assert all(p.grad is None for p in encoder.parameters())
    assert all(p.grad is not None for p in grid.probes.parameters())


# ---- k-NN and per-video scores against independent references --------------------------------------------------


def fake_split(features: np.ndarray, videos: list[int], labels: list[int], valid=None, views: int = 1) -> FeatureSplit:
    split = FeatureSplit.__new__(FeatureSplit)
    split.shards = [features.astype(np.float16)]
    split.starts = np.array([0, len(features)])
    split.video = np.asarray(videos)
    split.view = np.zeros(len(videos), dtype=np.int64)
    split.crop = np.zeros(len(videos), dtype=np.int64)
    split.label = np.asarray([labels[v] for v in videos])
    split.valid = np.ones(len(videos), dtype=bool) if valid is None else np.asarray(valid)
    split.failures = [(v, f"v{v}.mp4", "unreadable") for v in sorted(set(videos)) if
                      not split.valid[np.asarray(videos) == v].any()]
    split.records = [type("R", (), {"label": label, "path": f"v{i}.mp4"})() for i, label in enumerate(labels)]
    split.expected_views = views
    split.directory = Path("fake")
    return split


def test_knn_votes_match_a_brute_force_reference():
    rng = np.random.default_rng(0)
    train = fake_split(rng.normal(size=(50, 2, 8)), list(range(50)), list(rng.integers(0, 3, 50)))
    knn = KNN(train, ["mean", "norm_mean"], KNNConfig(ks=[1, 5], temperature=0.1), 3, torch.device("cpu"))
    queries = rng.normal(size=(4, 2, 8)).astype(np.float32)
    probs = knn(queries)
    assert probs.shape == (4, 4, 3) and knn.names == ["mean k=1", "mean k=5", "norm_mean k=1", "norm_mean k=5"]
    bank = train.rows(np.arange(50))
    for q in range(4):
        for p in range(2):
            sims = [float(np.dot(queries[q, p], b) / np.linalg.norm(queries[q, p]) / np.linalg.norm(b))
                    for b in bank[:, p]]
            order = sorted(range(50), key=lambda i: -sims[i])
            for column, k in ((2 * p, 1), (2 * p + 1, 5)):
                votes = np.zeros(3)
                for i in order[:k]:
                    votes[train.label[i]] += np.exp(sims[i] / 0.1)
                np.testing.assert_allclose(probs[q, column].numpy(), votes / votes.sum(), rtol=1e-4)


def test_per_video_scores_match_engine_evaluate():
    rng = np.random.default_rng(1)
    labels = [0, 1, 2, 3, 1, 2]
    videos = [v for v in range(6) for _ in range(3)]  # 3 views each, consecutive as in a cached test split
    valid = np.ones(18, dtype=bool)
    valid[[3, 4, 5]] = False  # video 1 unreadable
    valid[7] = False  # video 2 partly
    split = fake_split(rng.normal(size=(18, 1, 4)), videos, labels, valid, views=3)
    table = torch.from_numpy(rng.dirichlet(np.ones(5), size=(18, 2))).float()  # per row, 2 columns, 5 classes

    def probabilities(features):  # rows are identified by their (distinct) features
        index = [int(np.argmin(np.abs(split.rows(np.arange(18))[:, 0, 0] - f[0, 0]))) for f in features]
        return table[index]

    summaries = score_videos(split, probabilities, 2, chunk_rows=4)
    for column in range(2):
        acc = ScoreAccumulator(6, 5)
        rows = np.flatnonzero(valid)
        acc.add(table[rows, column].double().log(), torch.from_numpy(split.video[rows]))
        acc.add_failures(split.failures)
        reference = summarize(acc, labels, [f"v{i}.mp4" for i in range(6)], expected_views=3)
        for key in ("top1", "top5", "mean_class_accuracy", "num_scored", "unscored"):
            assert summaries[column][key] == pytest.approx(reference[key]) if isinstance(reference[key], float) \
                else summaries[column][key] == reference[key], key
        assert [p[:2] for p in summaries[column]["partially_scored"]] == [("v2.mp4", 2)]


def test_the_choice_is_made_on_validation_never_on_test():
    val = [{"top1": 0.5}, {"top1": 0.7}, {"top1": 0.7}, {"top1": 0.2}]
    assert choose_on_validation(val) == 1  # the first of equals; the test scores are not an argument


# ---- the feature cache -----------------------------------------------------------------------------------------


class CountingEncoder:
    """``FeatureEncoder.pooled`` that counts the clips it saw."""

    def __init__(self, encoder: FeatureEncoder):
        self.encoder, self.clips = encoder, 0

    def __call__(self, video):
        self.clips += len(video)
        return self.encoder.pooled(video)


def extract(directory: Path, dataset, forward, data: DataConfig, **kwargs) -> FeatureSplit:
    cfg = FeatureConfig(shard_items=3, micro_batch=4, num_workers=0, last_k=2)
    return extract_split(forward, 64, dataset, directory, {"what": "test"}, cfg,
                         to_input=lambda v: model_input(v, data), device=torch.device("cpu"), **kwargs)


@pytest.fixture(scope="module")
def tiny_encoder():
    torch.manual_seed(0)
    return FeatureEncoder(tiny_vit(), last_k=2).eval()


def test_cached_features_equal_a_direct_forward_and_survive_a_crash(tmp_path, data_root, tiny_encoder):
    data = data_config(data_root)
    train = AugmentedViews(TrainClips(load_records(data, "train")[:5], data, clip_len=4, size=32, seed=1), views=2)
    crashed = CountingEncoder(tiny_encoder)

    def crash_after_shard_1(k):
        if k == 1:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        extract(tmp_path / "a", train, crashed, data, on_shard=crash_after_shard_1)
    assert crashed.clips == 6  # shards 0 and 1, three items of one clip each
    kept = {k: os.stat(shard_path(tmp_path / "a", k, ".npy")).st_mtime_ns for k in (0, 1)}
    resumed = CountingEncoder(tiny_encoder)
    split = extract(tmp_path / "a", train, resumed, data)
    assert resumed.clips == 4  # only the 4 missing items (10 items, shards of 3)
    assert {k: os.stat(shard_path(tmp_path / "a", k, ".npy")).st_mtime_ns for k in (0, 1)} == kept
    whole = extract(tmp_path / "b", train, CountingEncoder(tiny_encoder), data)
    np.testing.assert_array_equal(split.rows(np.arange(10)), whole.rows(np.arange(10)))
    # item j: view j // 5 of video j % 5, exactly what a direct forward of that clip gives
    assert list(split.video) == [0, 1, 2, 3, 4] * 2 and list(split.view) == [0] * 5 + [1] * 5
    for item in (0, 7):
        clip = train[item]["video"]
        with torch.no_grad():
            direct = tiny_encoder.pooled(model_input(clip, data)).numpy()
        np.testing.assert_allclose(split.rows(np.array([item])), direct, rtol=1e-3, atol=1e-3)  # fp16 storage
    with pytest.raises(ConfigError, match="extracted with other settings \\(what differ\\)"):
        extract_split(crashed, 64, train, tmp_path / "a", {"what": "else"}, FeatureConfig(),
                      to_input=lambda v: v, device=torch.device("cpu"))


def test_unreadable_test_videos_are_named_and_left_unscored(tmp_path, data_root, tiny_encoder):
    data = data_config(data_root, val_list=str(data_root / "test_with_broken.csv"))
    test = EvalClips(load_records(data, "val")[:6], data, clip_len=4, size=32)  # 2 temporal x 3 spatial views
    split = extract(tmp_path / "test", test, tiny_encoder.pooled, data)
    assert len(split) == 6 * 2 * 3 and split.expected_views == 6
    assert [f[1] for f in split.failures] == [str(data_root / "broken.mp4")]  # the fifth video
    assert not split.valid[24:30].any() and split.valid[:24].all() and split.valid[30:].all()
    assert list(split.crop[:6]) == [0, 1, 2, 0, 1, 2] and list(split.view[:6]) == [0, 0, 0, 1, 1, 1]
    summary = score_videos(split, lambda f: torch.full((len(f), 1, 4), 0.25), 1)[0]
    assert summary["num_scored"] == 5 and summary["unscored"][0][0] == str(data_root / "broken.mp4")


# ---- the entry point -------------------------------------------------------------------------------------------


def command(out: Path, data_root: Path, *overrides: str, launcher=(sys.executable,)) -> list[str]:
    return entry_command("probe.py", RECIPE, out, f"data.root={data_root}", f"data.synthetic={SYNTHETIC}",
            "model.num_classes=4", "data.num_classes=4", "model.encoder.num_frames=4",
            "model.encoder.img_size=32", "data.eval_augment.short_side=32", "data.sampling_rate=2",
            "features.shard_items=4", "features.micro_batch=8", "features.num_workers=0", "grid.lrs=[0.1,0.8]",
            "batch.micro_batch=8", "optim.epochs=3", "optim.warmup_epochs=1", "eval.every_epochs=1",
            "run.save_every_epochs=1", "run.log_every=1", *overrides, launcher=launcher)


@pytest.fixture(scope="module")
def stopped_and_resumed(tmp_path_factory, data_root):
    """A one-rank run stopped by SIGTERM during its feature extraction, then run again to the end."""
    out = tmp_path_factory.mktemp("probe") / "run"
    process = subprocess.Popen(command(out, data_root), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    deadline = time.time() + 240
    while not shard_path(out / "features" / "train", 0, ".json").is_file():
        assert process.poll() is None and time.time() < deadline, "the run ended before its first shard"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=240)
    assert process.returncode == 75, output[-3000:]
    train_shards = len(list((out / "features" / "train").glob("*.json")))
    assert 1 < train_shards < 17  # spec.json and some of the 16 shards: stopped between two shards
    assert "stopping on SIGTERM after feature shard" in output
    result = run(command(out, data_root))
    return out, output + result.stderr, train_shards


@pytest.mark.e2e
def test_a_run_stopped_during_extraction_resumes_and_reports_heads_and_knn(stopped_and_resumed):
    out, output, _ = stopped_and_resumed
    results = json.loads((out / "probe_results.json").read_text())
    linear = results["linear"]
    assert len(linear["all"]) == 3 * 2 * 2  # pools x lrs x weight decays
    best_val = max(entry["val"]["top1"] for entry in linear["all"])
    assert linear["chosen"]["val"]["top1"] == best_val
    assert linear["all"][linear["chosen"]["index"]]["name"] == linear["chosen"]["name"]
    assert [e["name"] for e in results["knn"]["all"]] == [f"{p} k={k}" for p in POOLS for k in (10, 20)]
    for entry in linear["all"] + results["knn"]["all"]:
        assert entry["test"]["num_scored"] == entry["test"]["num_videos"] == 8
    head = torch.load(out / "best_head.pt", weights_only=True)
    assert set(head) == {"weight", "bias", "feature_mean", "feature_std"} and head["weight"].shape == (4, 64)
    table = (out / "probe_results.md").read_text()
    assert "**chosen**" in table and "## k-NN" in table
    assert "train: shard 15" in output  # the missing shards were extracted on the second run


@pytest.mark.e2e
def test_two_ranks_give_the_features_and_results_of_one(stopped_and_resumed, tmp_path, data_root):
    one, _, _ = stopped_and_resumed
    two = tmp_path / "two"
    run(command(two, data_root, "batch.micro_batch=4", launcher=TORCHRUN), timeout=400)
    for split in ("train", "val", "test"):
        a = FeatureSplit(one / "features" / split, len(list((one / "features" / split).glob("*.npy"))), [], 1)
        b = FeatureSplit(two / "features" / split, len(list((two / "features" / split).glob("*.npy"))), [], 1)
        np.testing.assert_array_equal(a.valid, b.valid)
        np.testing.assert_allclose(a.rows(np.arange(len(a))), b.rows(np.arange(len(b))), rtol=2e-3, atol=2e-3)
    weights_one = torch.load(one / "weights.pt", weights_only=True)
    weights_two = torch.load(two / "weights.pt", weights_only=True)
    for key in weights_one:
        torch.testing.assert_close(weights_one[key], weights_two[key], rtol=1e-3, atol=1e-4, msg=key)
    results_one = json.loads((one / "probe_results.json").read_text())
    results_two = json.loads((two / "probe_results.json").read_text())
    assert results_one["linear"]["chosen"]["name"] == results_two["linear"]["chosen"]["name"]
    assert results_one["knn"] == results_two["knn"]


@pytest.mark.e2e
def test_a_head_trained_alone_is_the_grids(stopped_and_resumed, tmp_path, data_root):
    grid_run, _, _ = stopped_and_resumed
    alone = tmp_path / "alone"
    shutil.copytree(grid_run / "features", alone / "features")  # the same cache: no extraction
    result = run(command(alone, data_root, "grid.lrs=[0.8]", "grid.weight_decays=[0.001]", "grid.pools=[norm_mean]",
                         "knn.enabled=false"))
    assert "extracting" not in result.stderr
    grid = torch.load(grid_run / "weights.pt", weights_only=True)
    single = torch.load(alone / "weights.pt", weights_only=True)
    index = [s.name for s in head_grid(POOLS, [0.1, 0.8], [0.0, 1e-3])].index("norm_mean lr=0.8 wd=0.001")
    for name in ("weight", "bias"):
        torch.testing.assert_close(single[f"heads.0.{name}"], grid[f"heads.{index}.{name}"], rtol=1e-5, atol=1e-6)


@pytest.mark.e2e
def test_the_entry_point_refuses_a_checkpoint_without_an_encoder(tmp_path, data_root, stopped_and_resumed):
    grid_run, _, _ = stopped_and_resumed
    result = run(command(tmp_path / "bad", data_root, f"model.init={grid_run / 'best_head.pt'}"), expect=2)
    assert "holds no video ViT encoder" in result.stderr and "Traceback" not in result.stderr


# ---- the attentive probe ---------------------------------------------------------------------------------------


def test_attentive_probes_trained_in_one_pass_are_the_probes_trained_alone():
    from engine.tasks.attentive_probe import probe_param_groups

    optim = OptimConfig(blr=1e-3, betas=(0.9, 0.999), weight_decay=0.01, min_lr=0, warmup_lr=0)
    generator = torch.Generator().manual_seed(0)
    video, labels = torch.randn(4, 3, 4, 32, 32, generator=generator), torch.tensor([0, 1, 2, 3])

    def trained(lrs):
        torch.manual_seed(0)
        grid = AttentiveProbeGrid(FeatureEncoder(tiny_vit(), last_k=1), len(lrs), 4).train()
        optimizer = optimizer_over(probe_param_groups(grid, lrs, optim), optim)
        for _ in range(3):
            for group in optimizer.param_groups:
                group["lr"] = 1e-3 * group["lr_scale"]
            optimizer.zero_grad()
            per_head_loss(grid(video), labels).backward()
            optimizer.step()
        return grid

    together, alone = trained([1e-3, 1e-2]), trained([1e-2])
    for (name, a), b in zip(together.probes[1].named_parameters(), alone.probes[0].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.allclose(together.probes[0].head.weight, together.probes[1].head.weight)


ATTENTIVE_SCRIPT = ROOT / "run_scripts" / "attentive_probe.py"
ATTENTIVE_RECIPE = ROOT / "run_scripts" / "configs" / "attentive_probe" / "tiny_cpu.yaml"


@pytest.mark.e2e
def test_the_attentive_probe_trains_only_its_probes_and_chooses_on_validation(tmp_path, data_root):
    pretrain = randomize(VideoMAE(PretrainModelConfig(tiny_vit())))
    torch.save({"model": pretrain.state_dict()}, tmp_path / "pretrained.pt")
    out = tmp_path / "attentive"
    run([sys.executable, str(ATTENTIVE_SCRIPT), "--config", str(ATTENTIVE_RECIPE), f"run.output_dir={out}",
         f"data.root={data_root}", f"data.synthetic={SYNTHETIC}", "model.num_classes=4", "data.num_classes=4",
         "model.encoder.num_frames=4", "model.encoder.img_size=32", "data.eval_augment.short_side=32",
         "data.sampling_rate=2", "grid.lrs=[0.001,0.01]", "batch.micro_batch=8", "batch.num_workers=0",
         "optim.epochs=2", "eval.every_epochs=1", f"model.init={tmp_path / 'pretrained.pt'}"])
    weights = torch.load(out / "weights.pt", weights_only=True)
    for key, value in pretrain.encoder.state_dict().items():  # the encoder is exactly the checkpoint's: frozen
        assert torch.equal(weights[f"backbone.encoder.{key}"], value), key
    results = json.loads((out / "probe_results.json").read_text())["attentive"]
    assert [e["name"] for e in results["all"]] == ["attentive lr=0.001", "attentive lr=0.01"]
    assert results["chosen"]["val"]["top1"] == max(e["val"]["top1"] for e in results["all"])
    assert all(e["test"]["num_scored"] == 8 for e in results["all"])
    probe = torch.load(out / "best_probe.pt", weights_only=True)
    chosen = results["chosen"]["index"]
    assert set(probe) == {k.removeprefix(f"probes.{chosen}.") for k in weights if k.startswith(f"probes.{chosen}.")}
    for key, value in probe.items():
        assert torch.equal(value, weights[f"probes.{chosen}.{key}"]), key
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum("val_top1_best_probe" in m for m in metrics) == 2


# ---- the k-NN monitor of pre-training --------------------------------------------------------------------------


@pytest.mark.e2e
def test_pretraining_logs_a_knn_accuracy_that_an_independent_knn_of_its_weights_reproduces(tmp_path, data_root):
    out = tmp_path / "pretrain"
    run([sys.executable, str(ROOT / "run_scripts" / "pretrain.py"), "--config",
         str(ROOT / "run_scripts" / "configs" / "pretrain" / "tiny_cpu.yaml"), f"run.output_dir={out}",
         f"data.root={data_root}", f"data.synthetic={SYNTHETIC}", "model.encoder.num_frames=4", "model.encoder.img_size=32",
         "data.sampling_rate=2", "data.eval_augment.short_side=32", "batch.micro_batch=8", "batch.num_workers=0",
         "optim.epochs=2", "optim.warmup_epochs=1", "run.vis_every_epochs=0", "run.save_every_epochs=1",
         "knn.every_epochs=1", "knn.k=5"])
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    knn = [r["knn_top1"] for r in logged if "knn_top1" in r]
    assert len(knn) == 2 and all(r["knn_unreadable"] == 0 for r in logged if "knn_top1" in r)
    # the last epoch's monitor read the final weights: a brute-force k-NN of those weights gives its accuracy
    encoder = FeatureEncoder(tiny_vit(), last_k=1)
    encoder.load(torch.load(out / "weights.pt", weights_only=True))
    encoder.eval()
    data = data_config(data_root, subtract_clip_mean=True, eval_augment=AugmentConfig(kind="eval", short_side=32))
    features = {}
    for split in ("train", "val"):
        clips = EvalClips(load_records(data, split), data, clip_len=4, size=32, temporal_views=1)
        rows = [clips[i] for i in range(len(clips))]
        with torch.no_grad():
            pooled = encoder.pooled(model_input(torch.cat([r["video"] for r in rows]), data), ["norm_mean"])[:, 0]
        features[split] = (pooled.numpy(), np.array([r["label"] for r in rows]))
    (bank, bank_labels), (queries, labels) = features["train"], features["val"]
    bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    correct = 0
    for query, label in zip(queries / np.linalg.norm(queries, axis=1, keepdims=True), labels):
        sims = bank @ query
        votes = np.zeros(4)
        for i in np.argsort(-sims)[:5]:
            votes[bank_labels[i]] += np.exp(sims[i] / 0.07)
        correct += int(votes.argmax() == label)
    assert knn[-1] == pytest.approx(correct / len(labels))
