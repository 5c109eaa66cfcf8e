"""Multi-view test scoring: per-video softmax averaging, combined across ranks with collectives.

Every rank scores its own exact share of the test items (``ResumableDistributedSampler(shuffle=False,
pad=False)`` over ``EvalClips``) into a ``ScoreAccumulator``; ``gather`` all-reduces the per-video sums and
view counts (no per-rank text files) and all-gathers the failures; ``summarize`` averages the softmax
probabilities of each video's views (softmax before averaging, as VideoMAE's fix #72) and reports top-1,
top-5 and mean per-class accuracy. A video with no view at all (unreadable) is listed under ``unscored``
and left out of every accuracy; it is never replaced by another video.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils.data import DataLoader

from datasets.sampler import ResumableDistributedSampler
from datasets.video_dataset import EvalClips, collate_clips, model_input
from engine import preempt
from engine.dist import all_gather_objects, group_rank_and_size, sum_over_ranks_
from engine.eval.lockstep import forwards_in_lockstep


class ScoreAccumulator:
    """Per-video sums of softmax probabilities and per-video view counts.

    ``scores``: float64 (num_videos, num_classes), or (num_videos, columns, num_classes) for several classifiers
    scored on the same views (a grid of probes: ``column(j)`` is classifier j's accumulator); ``counts``: int64
    (num_videos,); ``failures``: list of (index, path, reason), one per failed item (a video may fail on several
    views).
    """

    def __init__(self, num_videos: int, num_classes: int, columns: Optional[int] = None):
        if num_videos < 1 or num_classes < 1 or (columns is not None and columns < 1):
            raise ValueError(f"need at least one video, one class and one column, got {num_videos}, {num_classes} "
                             f"and {columns}")
        self.num_videos = num_videos
        self.num_classes = num_classes
        self.columns = columns
        shape = (num_videos, num_classes) if columns is None else (num_videos, columns, num_classes)
        self.scores = torch.zeros(shape, dtype=torch.float64)
        self.counts = torch.zeros(num_videos, dtype=torch.int64)
        self.failures: list[tuple[int, str, str]] = []

    def add(self, logits: torch.Tensor, video_index: torch.Tensor) -> None:
        """Add views: ``logits`` (N, C) -- (N, columns, C) with columns --, one row per view (crop);
        ``video_index`` (N,) the video of each row."""
        logits = logits.detach().to("cpu", torch.float64)
        index = torch.as_tensor(video_index).to("cpu", torch.int64).reshape(-1)
        if logits.shape != (index.numel(), *self.scores.shape[1:]):
            raise ValueError(f"logits {tuple(logits.shape)} do not match "
                             f"{(index.numel(), *self.scores.shape[1:])}")
        if index.numel() and not (0 <= int(index.min()) and int(index.max()) < self.num_videos):
            raise ValueError(f"video index outside 0..{self.num_videos - 1}")
        self.scores.index_add_(0, index, logits.softmax(dim=-1))
        self.counts.index_add_(0, index, torch.ones_like(index))

    def column(self, j: int) -> "ScoreAccumulator":
        """Classifier ``j``'s scores, counts and failures, as an accumulator of one classifier."""
        out = ScoreAccumulator(self.num_videos, self.num_classes)
        out.scores, out.counts, out.failures = self.scores[:, j], self.counts, self.failures
        return out

    def add_failures(self, failures: Iterable) -> None:
        """Record unreadable items: ``Failure(index, path, reason)`` objects (or 3-tuples) from ``collate_clips``."""
        for failure in failures:
            # (a tuple has an ``index`` method too: test for the tuple)
            index, path, reason = failure if isinstance(failure, tuple) else (failure.index, failure.path,
                                                                              failure.reason)
            self.failures.append((int(index), str(path), str(reason)))


def gather(acc: ScoreAccumulator) -> ScoreAccumulator:
    """Combine every rank's accumulator (collective: call on all ranks); returns a new one, same on all ranks.

    Sums ``scores`` (num_videos, C) and ``counts`` (num_videos,) with all_reduce and concatenates the
    failures with all_gather_object (sorted, so the result does not depend on the split). Without a process
    group (or with one rank) it returns a copy of ``acc``.
    """
    out = ScoreAccumulator(acc.num_videos, acc.num_classes, acc.columns)
    out.scores, out.counts = acc.scores.clone(), acc.counts.clone()
    sum_over_ranks_(out.scores)
    sum_over_ranks_(out.counts)
    out.failures = sorted({f for part in all_gather_objects(list(acc.failures)) for f in part})
    return out


def topk_correct(probs: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """bool (V,): label among the ``k`` best classes of ``probs`` (V, C); k clipped to C."""
    top = probs.topk(min(k, probs.shape[1]), dim=1).indices
    return (top == labels[:, None]).any(dim=1)


def mean_class_accuracy(correct: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over the classes present in ``labels`` (V,) of the fraction of ``correct`` (V,) videos."""
    per_class = [correct[labels == c].double().mean().item() for c in labels.unique().tolist()]
    return sum(per_class) / len(per_class) if per_class else 0.0


def _reasons(acc: ScoreAccumulator) -> dict[int, list[str]]:
    """video index → reasons of its failed items, in order."""
    out: dict[int, list[str]] = {}
    for index, _, reason in acc.failures:
        out.setdefault(index, []).append(reason)
    return out


def summarize(acc: ScoreAccumulator, labels: Sequence[int], paths: Sequence[str], expected_views: int) -> dict:
    """Accuracy of the per-video mean of softmax probabilities (call on the gathered accumulator).

    ``labels``, ``paths``: one per video (num_videos,); ``expected_views``: rows per video when nothing
    fails (temporal views × spatial crops). Returns ``top1``, ``top5`` (k clipped to num_classes),
    ``mean_class_accuracy`` (classes with no scored video excluded), all in [0, 1] over scored videos;
    ``num_videos``, ``num_scored``; ``unscored``: [(path, reason)] for videos with no view;
    ``partially_scored``: [(path, views, reason)] for videos scored on fewer than ``expected_views`` views.
    """
    if len(labels) != acc.num_videos or len(paths) != acc.num_videos:
        raise ValueError(f"{len(labels)} labels and {len(paths)} paths for {acc.num_videos} videos")
    reasons = _reasons(acc)
    scored = acc.counts > 0
    label_t = torch.as_tensor(list(labels), dtype=torch.int64)[scored]
    probs = acc.scores[scored] / acc.counts[scored, None]  # (V_scored, C); counts >= 1, no division by zero
    top1 = topk_correct(probs, label_t, 1)
    top5 = topk_correct(probs, label_t, 5)
    n = int(scored.sum())
    counts = acc.counts.tolist()

    def why(i: int) -> str:
        return "; ".join(reasons.get(i, [])) or "no view was scored"

    return {
        "top1": top1.double().mean().item() if n else 0.0,
        "top5": top5.double().mean().item() if n else 0.0,
        "mean_class_accuracy": mean_class_accuracy(top1, label_t),
        "num_videos": acc.num_videos,
        "num_scored": n,
        "unscored": [(paths[i], why(i)) for i, c in enumerate(counts) if c == 0],
        "partially_scored": [(paths[i], c, why(i)) for i, c in enumerate(counts) if 0 < c < expected_views],
    }


@torch.no_grad()
def score_views(forward: Callable[[torch.Tensor], torch.Tensor], dataset: EvalClips, *, num_classes: int,
                micro_batch: int, num_workers: int, device: torch.device, dtype: torch.dtype,
                collective_forward: bool = False, columns: Optional[int] = None) -> ScoreAccumulator:
    """Score every view of ``dataset`` once, split over the ranks; returns the gathered accumulator (call on
    every rank).

    ``forward``: clips (B, C, T, H, W) of ``dtype``, normalized as ``dataset.cfg`` says, -> logits
    (B, num_classes), or (B, columns, num_classes) for several classifiers at once (``columns``), in eval mode.
    Each rank takes its exact share of the items (no padding, so no view is counted twice); per-video softmax
    sums are combined with collectives. ``collective_forward`` (ZeRO-3, whose forward gathers parameters from
    every rank): ranks with fewer batches, or with a batch whose videos all failed, run a forward on the dataset's
    blank item so that every rank calls it the same number of times.
    """
    rank, world = group_rank_and_size()
    sampler = ResumableDistributedSampler(len(dataset), world, rank, shuffle=False, pad=False)
    loader = DataLoader(dataset, batch_size=micro_batch, sampler=sampler, collate_fn=collate_clips,
                        num_workers=num_workers, pin_memory=device.type == "cuda",
                        generator=torch.Generator())  # not the global RNG: validation must not shift training's
    acc = ScoreAccumulator(len(dataset.records), num_classes, columns)
    blank = model_input(collate_clips([dataset.blank_item()])["video"].to(device), dataset.cfg, dtype)

    def run(batch: dict) -> bool:
        acc.add_failures(batch["failures"])
        if batch["video"] is None:
            return False
        acc.add(forward(model_input(batch["video"].to(device, non_blocking=True), dataset.cfg, dtype)).float(),
                batch["index"])
        return True

    # validation runs during training: its loader's workers must survive the signals
    forwards_in_lockstep(preempt.iterate(loader), len(loader), run, lambda: forward(blank), collective_forward)
    return gather(acc)


def evaluate_clips(forward: Callable[[torch.Tensor], torch.Tensor], dataset: EvalClips, **scoring) -> dict:
    """``summarize`` of ``score_views(forward, dataset, **scoring)`` against the dataset's labels and paths."""
    return _summarize_dataset(score_views(forward, dataset, **scoring), dataset)


def evaluate_columns(forward: Callable[[torch.Tensor], torch.Tensor], dataset: EvalClips, columns: int,
                     **scoring) -> list[dict]:
    """``evaluate_clips`` of a forward that gives (B, columns, num_classes): one summary per classifier, all from
    one pass over the views."""
    acc = score_views(forward, dataset, columns=columns, **scoring)
    return [_summarize_dataset(acc.column(j), dataset) for j in range(columns)]


def _summarize_dataset(acc: ScoreAccumulator, dataset: EvalClips) -> dict:
    records = dataset.records
    return summarize(acc, [r.label for r in records], [r.path for r in records],
                     expected_views=dataset.views_per_video)


@dataclass
class EvalConfig:
    # validate (one temporal view, one centre crop) every this many epochs and after the last; 0 = never
    every_epochs: int = 5
    # test items per rank and forward; an item is one temporal view cut into eval_augment's spatial crops
    micro_batch: int = 4
    # run the multi-view test (data.test_temporal_views x data.eval_augment.num_spatial_views) after training
    final_test: bool = True

    def __post_init__(self) -> None:
        if self.every_epochs < 0 or self.micro_batch < 1:
            raise ValueError(f"every_epochs must be >= 0 and micro_batch >= 1, got {self.every_epochs}, "
                             f"{self.micro_batch}")


def describe_scores(title: str, summary: dict) -> str:
    """A few lines for the log: accuracies, how many videos were scored, which could not be read."""
    lines = [f"{title}: top-1 {100 * summary['top1']:.2f}  top-5 {100 * summary['top5']:.2f}  mean class "
             f"{100 * summary['mean_class_accuracy']:.2f}  ({summary['num_scored']} of {summary['num_videos']} "
             "videos scored)"]
    lines += [f"  unreadable: {path}: {reason}" for path, reason in summary["unscored"]]
    lines += [f"  partly scored ({views} views): {path}: {reason}" for path, views, reason in
              summary["partially_scored"]]
    return "\n".join(lines)
