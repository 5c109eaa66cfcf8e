"""k-NN classification of frozen features: the weighted vote (``knn_probabilities``), its grid over cached probe
features (``KNN``), and the accuracy monitor of pre-training (``KNNMonitor``), the quick one VIMPAC used on a small
labelled list.

Monitor: every ``every_epochs`` epochs the encoder (in eval mode, no gradients) reads one centre clip of every video of a
labelled bank list and of a query list; each query takes the class vote of its k nearest bank clips (cosine
similarity of the mean of the encoder's final-norm tokens, votes weighted by exp(similarity / temperature)). The
top-1 accuracy is logged with the epoch's metrics (``eval/knn_top1``). Videos that cannot be read are left out and
counted (``eval/knn_unreadable``). The clips are split over the ranks, every rank running the same number of
forwards (ZeRO-3 gathers parameters in each), and the features gathered.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from datasets.video_dataset import DataConfig, EvalClips, collate_clips, load_records, model_input
from engine import ds
from engine.config import require
from engine.dist import all_gather_objects, group_rank_and_size
from engine.eval.features import FeatureSplit
from engine.eval.lockstep import forwards_in_lockstep
from models.vit import ViTConfig

log = logging.getLogger("knn")


@dataclass
class KNNMonitorConfig:
    # score k-NN of the encoder every this many epochs (and after the last); 0 = never
    every_epochs: int = 0
    # labelled list of the bank (data.format, relative to data.root); "" = data.train_list
    train_list: str = ""
    # labelled list of the queries; "" = data.val_list
    val_list: str = ""
    # neighbours that vote
    k: int = 20
    # temperature of the vote weights
    temperature: float = 0.07
    # clips per forward
    micro_batch: int = 16

    def __post_init__(self) -> None:
        require(self.every_epochs >= 0, f"every_epochs must be >= 0, got {self.every_epochs}")
        require(self.k >= 1 and self.micro_batch >= 1, f"k and micro_batch must be >= 1, got {self.k}, "
                f"{self.micro_batch}")
        require(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")


class KNNMonitor:
    """The bank and query clips of a ``KNNMonitorConfig``, read when first needed, and the accuracy of an encoder
    on them."""

    def __init__(self, cfg: KNNMonitorConfig, data: DataConfig, encoder: ViTConfig, epochs: int):
        self.cfg, self.epochs = cfg, epochs
        eval_augment = dataclasses.replace(data.eval_augment, num_spatial_views=1)
        self.data = dataclasses.replace(data, train_list=cfg.train_list or data.train_list,
                                        val_list=cfg.val_list or data.val_list, test_list="",
                                        eval_augment=eval_augment)
        self.clip_len, self.size = encoder.num_frames, encoder.img_size
        self._sets: Optional[tuple[EvalClips, EvalClips]] = None

    def due(self, epoch: int) -> bool:
        every = self.cfg.every_epochs
        return bool(every) and (epoch % every == 0 or epoch >= self.epochs)

    def _clips(self) -> tuple[EvalClips, EvalClips]:
        if self._sets is None:
            self._sets = tuple(EvalClips(load_records(self.data, split), self.data, clip_len=self.clip_len,
                                         size=self.size, temporal_views=1) for split in ("train", "val"))
            if any(r.label is None or r.label < 0 for s in self._sets for r in s.records):
                raise ValueError("the k-NN monitor needs labelled lists (knn.train_list / knn.val_list)")
        return self._sets

    @torch.no_grad()
    def _features(self, encoder: torch.nn.Module, dataset: EvalClips, device: torch.device,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(features (n, D) L2-normalized, labels (n,), unreadable videos) of every readable clip, on every rank."""
        (rank, world), size = group_rank_and_size(), self.cfg.micro_batch
        rounds = math.ceil(len(dataset) / (size * world))  # the same on every rank
        batches = (collate_clips([dataset[i] for i in range(start, min(start + size, len(dataset)))])
                   for start in range(rank * size, len(dataset), world * size))
        features, labels, failed = [], [], [0]

        def run(batch: dict) -> bool:
            failed[0] += len(batch["failures"])
            if batch["video"] is None:
                return False
            video = model_input(batch["video"].to(device), self.data, dtype)
            features.append(F.normalize(encoder.forward_features(video).float().mean(dim=1), dim=-1).cpu())
            labels.append(batch["label"])
            return True

        blank = model_input(collate_clips([dataset.blank_item()])["video"].to(device), self.data, dtype)
        # every rank runs the same forwards whatever the engine (ZeRO-3 gathers in them): one count for all
        forwards_in_lockstep(batches, rounds, run, lambda: encoder.forward_features(blank), collective_forward=True)
        mine = (torch.cat(features) if features else torch.zeros(0, encoder.embed_dim),
                torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64), failed[0])
        parts = all_gather_objects(mine)
        return (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), sum(p[2] for p in parts))

    def __call__(self, encoder: torch.nn.Module, device: torch.device, dtype: torch.dtype,
                 num_classes: Optional[int] = None) -> dict:
        """``{"knn_top1", "knn_unreadable"}`` of ``encoder`` (a ViT whose ``forward_features`` gives the final-norm
        tokens); call on every rank, in eval mode."""
        bank_set, query_set = self._clips()
        bank, bank_labels, bank_failed = self._features(encoder, bank_set, device, dtype)
        queries, labels, query_failed = self._features(encoder, query_set, device, dtype)
        if not len(bank) or not len(queries):
            raise ValueError("the k-NN monitor could not read any bank or query video")
        classes = num_classes or int(max(bank_labels.max(), labels.max())) + 1
        (probs,) = knn_probabilities(bank, bank_labels, queries, [self.cfg.k], self.cfg.temperature, classes)
        top1 = (probs.argmax(dim=1) == labels).double().mean().item()
        return {"knn_top1": top1, "knn_unreadable": bank_failed + query_failed}


def monitor_after_epoch(monitor: Optional[KNNMonitor], engine, epoch: int) -> Optional[dict]:
    """The k-NN result of ``engine.module.encoder`` after ``epoch`` when the monitor is due (logged), else None; a
    pre-training task's ``on_epoch_end`` returns it. Every rank calls it."""
    if monitor is None or not monitor.due(epoch):
        return None
    engine.eval()
    try:
        result = monitor(engine.module.encoder, engine.device, ds.input_dtype(engine))
    finally:
        engine.train()
    log.info("epoch %d k-NN (k=%d) top-1 %.2f", epoch, monitor.cfg.k, 100 * result["knn_top1"])
    return result


@dataclass
class KNNConfig:
    # score k-NN on the cached features (cosine similarity, votes weighted by exp(similarity / temperature))
    enabled: bool = True
    # neighbours counted; each k is one setting of the table, chosen on validation like the heads
    ks: list[int] = field(default_factory=lambda: [10, 20, 100])
    # temperature of the vote weights (DINO, VIMPAC: 0.07)
    temperature: float = 0.07

    def __post_init__(self) -> None:
        require(bool(self.ks) and all(k >= 1 for k in self.ks), f"ks must be integers >= 1, got {self.ks}")
        require(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")


def knn_probabilities(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, ks: list[int],
                      temperature: float, num_classes: int) -> list[torch.Tensor]:
    """Weighted k-NN votes, one (n, num_classes) tensor of class probabilities per k: the cosine similarities of
    the queries (n, D) to the bank (N, D) (both L2-normalized), the top k voting for their labels with weights
    exp(similarity / temperature), normalized to sum to 1 (DINO's and VIMPAC's monitor)."""
    k_max = min(max(ks), bank.shape[0])
    # queries a few at a time: the similarities to a bank of a million clips are 4 MB per query
    step = max(1, 2**28 // bank.shape[0])
    parts = [(q.to(bank.dtype) @ bank.T).float().topk(k_max, dim=1) for q in queries.split(step)]
    similarity, index = torch.cat([p.values for p in parts]), torch.cat([p.indices for p in parts])  # (n, k_max)
    weights = (similarity.double() / temperature).exp()
    votes_of = bank_labels[index]
    out = []
    for k in ks:
        k = min(k, k_max)
        votes = torch.zeros(len(queries), num_classes, device=queries.device, dtype=torch.float64)
        votes.scatter_add_(1, votes_of[:, :k], weights[:, :k])
        out.append(votes / votes.sum(dim=1, keepdim=True))
    return out


class KNN:
    """k-NN over the cached training features (every view of every readable clip is in the bank): one column per
    (pooled feature, k), as ``knn_probabilities`` scores it."""

    def __init__(self, train: FeatureSplit, pools: list[str], cfg: KNNConfig, num_classes: int,
                 device: torch.device):
        self.names = [f"{pool} k={k}" for pool in pools for k in cfg.ks]
        self.specs = [(pool, k) for pool in pools for k in cfg.ks]
        self.ks, self.temperature, self.num_classes = list(cfg.ks), cfg.temperature, num_classes
        # float16 on a GPU (a million clips x 3 features x 1280 wide fits), float32 on the CPU (no fast fp16 there)
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        chunks = [F.normalize(torch.from_numpy(chunk).to(device), dim=-1).to(dtype) for _, chunk in train.chunks()]
        self.bank = torch.cat(chunks).transpose(0, 1).contiguous()  # (P, N, D), L2-normalized
        self.labels = torch.from_numpy(train.label[train.valid]).to(device)

    def __call__(self, features: np.ndarray) -> torch.Tensor:
        queries = F.normalize(torch.from_numpy(features).to(self.bank.device), dim=-1)
        columns = []
        for p in range(self.bank.shape[0]):
            columns += knn_probabilities(self.bank[p], self.labels, queries[:, p], self.ks, self.temperature,
                                         self.num_classes)
        return torch.stack(columns, dim=1)
