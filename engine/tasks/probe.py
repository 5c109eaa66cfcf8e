"""Frozen-encoder evaluation: a grid of linear probes and k-NN on cached features (``LinearProbeTask``), and
V-JEPA's attentive probe on every token (``AttentiveProbeTask``), both trained by ``engine.loop``.

A linear probe run extracts the frozen encoder's pooled features once (``engine.eval.features``: augmented views of
every training video, the validation clip and the multi-view test clips of every video), trains every head of
``grid`` (pooled feature x learning rate x weight decay) in one pass over the cached training features, and at
the end scores each head and each k-NN setting on validation and on the multi-view test. The head (and the k-NN
setting) reported as the result is the one with the best *validation* top-1; the test never chooses.

Outputs beside the run: ``probe_results.json`` and ``probe_results.md`` (every head and k-NN setting, the chosen
ones marked), ``best_head.pt`` (the chosen head as a standalone classifier of its pooled feature), ``weights.pt``
(every head), ``features/``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from datasets.files import write_text_atomic
from datasets.transforms import AugmentConfig
from datasets.video_dataset import AugmentedViews, DataConfig, model_input
from engine import checkpoint, ds
from engine.config import BatchConfig, ConfigError, require, to_dict
from engine.data import multiview_test_set, train_clips, validation_set
from engine.dist import is_main_process
from engine.eval.features import FeatureConfig, FeatureSplit, extract_split
from engine.eval.knn import KNN, KNNConfig
from engine.eval.multiview import mean_class_accuracy, topk_correct
from engine.eval.report import choose_on_validation, describe_results, result_entry, results_table
from engine.frozen import ProbeModelConfig, build_feature_encoder
from engine.loop import RunConfig
from engine.optim import OptimConfig, optimizer_over
from engine.task import Task, export_final_weights
from models.probe import POOLS, HeadSpec, LinearHeadGrid, head_grid, per_head_loss

log = logging.getLogger("probe")


# ---- configuration ---------------------------------------------------------------------------------------------


@dataclass
class GridConfig:
    # base learning rates of the heads: a head's peak lr is lr x global batch / 256 (optim.blr's rule; the grid
    # replaces optim.blr, which only names the reference the schedule is logged at)
    lrs: list[float] = field(default_factory=lambda: [0.025, 0.05, 0.1, 0.2, 0.4, 0.8])
    # weight decays of the heads (SGD's / LARS's L2 term; VideoMAE's probe: 0)
    weight_decays: list[float] = field(default_factory=lambda: [0.0, 1e-4])
    # pooled features the heads read (a subset of features.pools); empty = all of them
    pools: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        require(bool(self.lrs) and all(lr > 0 for lr in self.lrs), f"lrs must be positive numbers, got {self.lrs}")
        require(bool(self.weight_decays) and all(wd >= 0 for wd in self.weight_decays),
                f"weight_decays must be numbers >= 0, got {self.weight_decays}")
        unknown = [p for p in self.pools if p not in POOLS]
        require(not unknown, f"unknown pools {unknown}; valid: {', '.join(POOLS)}")


@dataclass
class ProbeEvalConfig:
    # score every head on the cached validation features every this many epochs and after the last; 0 = only at
    # the end
    every_epochs: int = 10

    def __post_init__(self) -> None:
        require(self.every_epochs >= 0, f"every_epochs must be >= 0, got {self.every_epochs}")


def _probe_optim() -> OptimConfig:
    # VideoMAE Table 11: SGD, base lr 0.1 (the grid's lrs replace it), weight decay 0, momentum 0.9, batch 1024,
    # cosine decay after 10 warmup epochs, 100 epochs; the lr starts and ends at 0 (MAE's linear probe).
    return OptimConfig(name="sgd", blr=0.1, weight_decay=0.0, momentum=0.9, epochs=100, warmup_epochs=10,
                       min_lr=0.0, warmup_lr=0.0)


def _probe_data() -> DataConfig:
    # VideoMAE Table 11: multi-scale crop of the training clips
    return DataConfig(train_augment=AugmentConfig(kind="multi_scale"))


@dataclass
class LinearProbeConfig:
    model: ProbeModelConfig = field(default_factory=ProbeModelConfig)  # frozen encoder, its weights, classes
    data: DataConfig = field(default_factory=_probe_data)  # video lists, clip sampling, training augmentation
    features: FeatureConfig = field(default_factory=FeatureConfig)  # what is cached, and how it is extracted
    grid: GridConfig = field(default_factory=GridConfig)  # the heads trained in one pass
    knn: KNNConfig = field(default_factory=KNNConfig)  # k-NN on the cached features
    eval: ProbeEvalConfig = field(default_factory=ProbeEvalConfig)  # validation during training
    # features per rank and micro-step; workers read the cached features (0: in the training process)
    batch: BatchConfig = field(default_factory=lambda: BatchConfig(micro_batch=256, num_workers=0))
    optim: OptimConfig = field(default_factory=_probe_optim)  # SGD or LARS, schedule, epochs
    ds: ds.DeepSpeedConfig = field(default_factory=lambda: ds.DeepSpeedConfig(template="zero0_fp32"))  # engine
    run: RunConfig = field(default_factory=RunConfig)  # output directory, seed, logging, checkpoints

    def __post_init__(self) -> None:
        if self.data.num_classes is not None and self.data.num_classes != self.model.num_classes:
            raise ValueError(f"data.num_classes {self.data.num_classes} differs from model.num_classes "
                             f"{self.model.num_classes}")
        missing = [p for p in self.grid.pools if p not in self.features.pools]
        if missing:
            raise ValueError(f"grid.pools {missing} are not cached: add them to features.pools "
                             f"({self.features.pools})")
        if self.optim.lr is not None or self.optim.layer_decay is not None:
            raise ValueError("a probe's learning rates are grid.lrs: leave optim.lr and optim.layer_decay null")
        if self.batch.repeats != 1:
            raise ValueError("batch.repeats must be 1: a probe's augmented views are features.train_views")
        if ds.zero_stage(self.ds) == 3:
            raise ValueError("a probe's heads are small and scored on every rank: use ZeRO stage 0-2")
        if self.features.last_k > self.model.encoder.dims()[1]:
            raise ValueError(f"features.last_k {self.features.last_k} exceeds the encoder's "
                             f"{self.model.encoder.dims()[1]} blocks")

    @property
    def heads(self) -> list[HeadSpec]:
        return head_grid(self.grid.pools or self.features.pools, self.grid.lrs, self.grid.weight_decays)


# ---- the frozen encoder ----------------------------------------------------------------------------------------


def _checkpoint_identity(path: str) -> dict:
    """What says the encoder's weights are the ones the cached features came from (path, size, time)."""
    if not path:
        return {"init": ""}
    stat = os.stat(path)
    return {"init": os.path.abspath(path), "init_bytes": stat.st_size, "init_mtime_ns": stat.st_mtime_ns}


def cache_features(cfg: LinearProbeConfig, device: torch.device) -> dict[str, FeatureSplit]:
    """Extract (or find) the train, val and test features of the run; every rank calls it."""
    torch.manual_seed(cfg.run.seed)  # a randomly initialised encoder is the same on every rank and in every run
    encoder = build_feature_encoder(cfg.model, cfg.features.last_k)
    dtype = cfg.features.dtype(device)
    encoder.to(device, dtype)
    pools = list(cfg.features.pools)
    geometry = {k: v for k, v in to_dict(cfg.model.encoder).items() if k not in ("drop_path", "checkpointing")}
    base = {"encoder": geometry, **_checkpoint_identity(cfg.model.init), "pools": pools,
            "tokenizer": _checkpoint_identity(cfg.model.tokenizer),
            "last_k": cfg.features.last_k, "shard_items": cfg.features.shard_items, "precision": str(dtype),
            "data": to_dict(cfg.data)}
    splits = {"train": AugmentedViews(train_clips(cfg.data, cfg.model.encoder, 1, cfg.run.seed),
                                      cfg.features.train_views),
              "val": validation_set(cfg.data, cfg.model.encoder), "test": multiview_test_set(cfg.data, cfg.model.encoder)}
    out = {}
    for name, dataset in splits.items():
        spec = {**base, "split": name, "items": len(dataset), "clips_per_item": dataset.clips_per_item}
        if name == "train":
            spec.update(views=cfg.features.train_views, seed=cfg.run.seed)
        out[name] = extract_split(
            lambda video: encoder.pooled(video, pools), encoder.dim, dataset,
            Path(cfg.run.output_dir) / "features" / name, spec, cfg.features,
            to_input=lambda video: model_input(video, cfg.data, dtype), device=device,
            stop_signals=(cfg.run.requeue_signal, cfg.run.stop_signal))
        for _, path, reason in out[name].failures:
            log.warning("%s features: unreadable video %s: %s", name, path, reason)
    return out


# ---- training on cached features -------------------------------------------------------------------------------


class CachedTrainViews(Dataset):
    """The cached training features as the loop's dataset: item ``i`` of epoch ``e`` is the features of video
    ``i``'s view ``e mod views``. Videos with a view that could not be read are left out (named in the log once)."""

    def __init__(self, split: FeatureSplit, views: int):
        self.split, self.views = split, views
        n = len(split.records)
        rows = np.full((views, n), -1, dtype=np.int64)
        for row in np.flatnonzero(split.valid):
            rows[split.view[row], split.video[row]] = row  # one clip per training item (batch.repeats = 1)
        keep = (rows >= 0).all(axis=0)
        self.rows = rows[:, keep]
        self.labels = np.asarray([r.label for r in split.records])[keep]
        self.left_out = int((~keep).sum())
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.rows.shape[1]

    def __getitem__(self, index: int) -> dict:
        row = self.rows[self.epoch % self.views, index]
        return {"features": torch.from_numpy(self.split.rows(np.array([row]))[0]), "label": int(self.labels[index])}

    def __getitems__(self, indices: list[int]) -> dict:
        """A whole batch in one read (the DataLoader calls this instead of ``__getitem__`` per item): reading rows
        one at a time cost more than training 32 heads on them."""
        index = np.asarray(indices)
        features = self.split.rows(self.rows[self.epoch % self.views, index])
        return {"features": torch.from_numpy(features), "label": torch.from_numpy(self.labels[index]),
                "failures": []}


def collate_features(items) -> dict:
    """A batch of cached features: ``CachedTrainViews.__getitems__`` already made it (one read per batch); a list
    of single items is stacked."""
    if isinstance(items, dict):
        return items
    return {"features": torch.stack([item["features"] for item in items]),
            "label": torch.tensor([item["label"] for item in items]), "failures": []}


def head_param_groups(model: LinearHeadGrid, specs: list[HeadSpec], blr: float) -> list[dict]:
    """One pair of optimizer groups per head: its weight with its own weight decay, its bias without; both at the
    head's learning rate (``lr_scale`` = the head's base lr / ``blr``, the base lr the schedule runs at)."""
    groups = []
    for index, (spec, head) in enumerate(zip(specs, model.heads)):
        scale = spec.lr / blr
        groups.append({"params": [head.weight], "lr_scale": scale, "weight_decay": spec.weight_decay,
                       "fixed_weight_decay": spec.weight_decay, "use_weight_decay": True,
                       "name": f"head{index}.weight"})
        groups.append({"params": [head.bias], "lr_scale": scale, "weight_decay": 0.0, "use_weight_decay": False,
                       "name": f"head{index}.bias"})
    return groups


# ---- scoring ---------------------------------------------------------------------------------------------------


def score_videos(split: FeatureSplit, probabilities: Callable[[np.ndarray], torch.Tensor], num_columns: int,
                 chunk_rows: int = 4096) -> list[dict]:
    """Per-video accuracy of several classifiers at once on a cached val / test split.

    ``probabilities(features (n, pools, D))`` → (n, num_columns, C): each column is one classifier (a head, a k-NN
    setting). A video's prediction is the mean of its views' probabilities (the multi-view test); a video with no
    readable view is unscored, as in ``engine.eval.multiview``. Returns one summary per column (top1, top5, mean class
    accuracy, videos scored, unscored). The rows of a video are consecutive (item order), so videos are scored a
    chunk at a time without holding every video's probabilities."""
    records = split.records
    valid = np.flatnonzero(split.valid)
    videos = split.video[valid]
    correct1, correct5, labels = [], [], []
    start = 0
    while start < len(valid):
        stop = min(start + chunk_rows, len(valid))
        while stop < len(valid) and videos[stop] == videos[stop - 1]:
            stop += 1  # never split a video's views between chunks
        rows = valid[start:stop]
        probs = probabilities(split.rows(rows)).double().cpu()  # (n, columns, C)
        ids, inverse = np.unique(videos[start:stop], return_inverse=True)
        sums = torch.zeros(len(ids), *probs.shape[1:], dtype=torch.float64)
        sums.index_add_(0, torch.from_numpy(inverse), probs)
        label = torch.tensor([records[i].label for i in ids])
        means = sums.transpose(0, 1)  # (columns, videos, C): the count divides every class alike, argmax unchanged
        correct1.append(torch.stack([topk_correct(m, label, 1) for m in means], dim=1))
        correct5.append(torch.stack([topk_correct(m, label, 5) for m in means], dim=1))
        labels.append(label)
        start = stop
    scored = int(sum(len(c) for c in correct1))
    c1 = torch.cat(correct1) if correct1 else torch.zeros(0, num_columns, dtype=torch.bool)
    c5 = torch.cat(correct5) if correct5 else torch.zeros(0, num_columns, dtype=torch.bool)
    label = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64)
    counts = np.bincount(videos, minlength=len(records))
    reasons: dict[int, list[str]] = {}
    for index, _, reason in split.failures:
        reasons.setdefault(index, []).append(reason)
    unscored = [(records[i].path, "; ".join(reasons.get(i, [])) or "no view was read")
                for i in np.flatnonzero(counts == 0)]
    partial = [(records[i].path, int(counts[i]), "; ".join(reasons.get(i, [])))
               for i in np.flatnonzero((counts > 0) & (counts < split.expected_views))]
    return [{"top1": c1[:, j].double().mean().item() if scored else 0.0,
             "top5": c5[:, j].double().mean().item() if scored else 0.0,
             "mean_class_accuracy": mean_class_accuracy(c1[:, j], label), "num_videos": len(records),
             "num_scored": scored, "unscored": unscored, "partially_scored": partial} for j in range(num_columns)]


def head_probabilities(model: LinearHeadGrid, device: torch.device) -> Callable[[np.ndarray], torch.Tensor]:
    @torch.no_grad()
    def probabilities(features: np.ndarray) -> torch.Tensor:
        return model(torch.from_numpy(features).to(device)).float().softmax(dim=-1)

    return probabilities


# ---- the task --------------------------------------------------------------------------------------------------


class LinearProbeTask(Task):
    """A grid of linear heads on the frozen encoder's cached features, for ``engine.loop.train``."""

    config_class = LinearProbeConfig
    outputs = ("config.yaml, derived.yaml, metrics.jsonl, tb/, checkpoints/, features/, weights.pt, best_head.pt, "
               "probe_results.json, probe_results.md")

    def __init__(self, cfg: LinearProbeConfig):
        super().__init__(cfg)
        self.device = _local_device()
        self.features = cache_features(cfg, self.device)
        train = self.features["train"]
        self.train_set = CachedTrainViews(train, cfg.features.train_views)
        if self.train_set.left_out:
            log.warning("left out %d training videos with an unreadable view", self.train_set.left_out)
        if len(self.train_set) == 0:
            raise ConfigError("no training video could be read: nothing to probe")
        self.specs = cfg.heads
        self.model = LinearHeadGrid(train.dim, cfg.model.num_classes, cfg.features.pools, self.specs,
                                    seed=cfg.run.seed)
        self.model.set_standardization(*train.standardization())
        log.info("%d heads (%s) on %d training videos x %d views", len(self.specs),
                 ", ".join(s.name for s in self.specs[:4]) + (", ..." if len(self.specs) > 4 else ""),
                 len(self.train_set), cfg.features.train_views)

    def collate(self, items: list) -> dict:
        return collate_features(items)

    def clips_in(self, batch: dict) -> int:
        return batch["features"].shape[0]

    def blank_batch(self, size: int) -> dict:
        split = self.features["train"]
        return {"features": torch.zeros(size, len(self.cfg.features.pools), split.dim),
                "label": torch.zeros(size, dtype=torch.int64), "failures": []}

    def build_optimizer(self) -> torch.optim.Optimizer:
        return optimizer_over(head_param_groups(self.model, self.specs, self.cfg.optim.blr), self.cfg.optim)

    def loss(self, engine, batch: dict, generator: torch.Generator) -> torch.Tensor:
        return per_head_loss(engine(batch["features"]), batch["label"])

    def score(self, model: LinearHeadGrid, split: str) -> list[dict]:
        model.eval()
        try:
            return score_videos(self.features[split], head_probabilities(model, self.device), len(self.specs))
        finally:
            model.train()

    def on_epoch_end(self, engine, epoch: int, output_dir: str, generator: torch.Generator) -> Optional[dict]:
        every = self.cfg.eval.every_epochs
        if not every or (epoch % every and epoch < self.cfg.optim.epochs):
            return None
        val = self.score(engine.module, "val")
        best = choose_on_validation(val)
        log.info("epoch %d validation: best head %s, top-1 %.2f (worst %.2f)", epoch, self.specs[best].name,
                 100 * val[best]["top1"], 100 * min(v["top1"] for v in val))
        return {"val_top1_best_head": val[best]["top1"], "val_best_head": best}

    def finish(self, engine, output_dir: str) -> None:
        """Export every head (weights.pt), then score the heads and k-NN on validation and the multi-view test,
        choose on validation, and write the results and the chosen head (rank 0)."""
        out = Path(output_dir)
        model = engine.module
        step = export_final_weights(engine, out)
        if not is_main_process():
            return
        results: dict[str, Any] = {"step": step, "encoder": self.cfg.model.init,
                                   "train_videos": len(self.train_set), "train_views": self.cfg.features.train_views,
                                   "unreadable": {s: [list(f) for f in split.failures]
                                                  for s, split in self.features.items()}}
        val, test = self.score(model, "val"), self.score(model, "test")
        chosen = choose_on_validation(val)
        results["linear"] = {
            "chosen": result_entry(self.specs[chosen].name, val[chosen], test[chosen], index=chosen),
            "all": [result_entry(s.name, v, t, pool=s.pool, lr=s.lr, weight_decay=s.weight_decay)
                    for s, v, t in zip(self.specs, val, test)]}
        head = {k: v.detach().float().cpu() for k, v in model.head_state(chosen).items()}
        checkpoint.export_weights(head, out / "best_head.pt")
        results["linear"]["chosen"]["weights"] = "best_head.pt"
        if self.cfg.knn.enabled:
            knn = KNN(self.features["train"], self.cfg.features.pools, self.cfg.knn, self.cfg.model.num_classes,
                      self.device)
            kval = score_videos(self.features["val"], knn, len(knn.names))
            ktest = score_videos(self.features["test"], knn, len(knn.names))
            best = choose_on_validation(kval)
            results["knn"] = {"chosen": result_entry(knn.names[best], kval[best], ktest[best], index=best),
                              "all": [result_entry(n, v, t, pool=p, k=k) for n, (p, k), v, t in
                                      zip(knn.names, knn.specs, kval, ktest)]}
        write_text_atomic(out / "probe_results.json", json.dumps(results, indent=2) + "\n")
        write_text_atomic(out / "probe_results.md", results_table(results) + "\n")
        log.info("%s", describe_results(results))
        log.info("wrote %s, %s and %s", out / "probe_results.json", out / "probe_results.md", out / "best_head.pt")


def _local_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
