"""Multi-view scoring: softmax averaging, metrics, failures, and a 2-rank gather equal to one process."""

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from datasets.sampler import ResumableDistributedSampler
from datasets.video_dataset import Failure
from engine.eval.multiview import ScoreAccumulator, gather, summarize


def test_softmax_before_averaging_matches_hand_computation():
    acc = ScoreAccumulator(1, 2)
    # view 0: huge confident logits for class 0; views 1, 2: mild preference for class 1
    acc.add(torch.tensor([[100.0, 0.0], [0.0, 1.0], [0.0, 1.0]]), torch.tensor([0, 0, 0]))
    p1 = math.exp(1) / (1 + math.exp(1))  # softmax([0, 1])[1]
    expected = torch.tensor([[1 + 2 * (1 - p1), 2 * p1]], dtype=torch.float64)
    assert torch.allclose(acc.scores, expected)
    assert acc.counts.tolist() == [3]
    # mean probability of class 1 = 2 * 0.731 / 3 = 0.487 < 0.5 -> class 0; averaging logits would give 33.3 vs 0.67
    assert summarize(acc, [1], ["a.mp4"], 3)["top1"] == 0.0
    assert summarize(acc, [0], ["a.mp4"], 3)["top1"] == 1.0
    # a fourth mild view tips the probability mass: a huge logit counts as at most probability 1
    acc.add(torch.tensor([[0.0, 1.0]]), torch.tensor([0]))
    assert summarize(acc, [1], ["a.mp4"], 4)["top1"] == 1.0


def _one_hot_logits(cls_order, num_classes=6):
    """Logits ranking classes in ``cls_order`` first (descending)."""
    logits = torch.zeros(num_classes)
    for rank, c in enumerate(cls_order):
        logits[c] = 10.0 - rank
    return logits


def test_top1_top5_mean_per_class_on_handmade_example():
    acc = ScoreAccumulator(4, 6)
    preds = [
        [0, 1, 2, 3, 4, 5],  # video 0, label 0: top-1 right
        [5, 4, 3, 2, 1, 0],  # video 1, label 0: label last -> top-5 wrong
        [2, 1, 0, 3, 4, 5],  # video 2, label 1: top-5 right, top-1 wrong
        [1, 0, 2, 3, 4, 5],  # video 3, label 1: top-1 right
    ]
    acc.add(torch.stack([_one_hot_logits(p) for p in preds]), torch.arange(4))
    out = summarize(acc, [0, 0, 1, 1], [f"v{i}" for i in range(4)], 1)
    assert out["top1"] == pytest.approx(0.5)
    assert out["top5"] == pytest.approx(0.75)
    assert out["mean_class_accuracy"] == pytest.approx(0.5)
    assert out["num_scored"] == 4 and out["unscored"] == [] and out["partially_scored"] == []
    # unbalanced classes: mean per class differs from top-1; classes 2..5 have no video and are excluded
    out = summarize(acc, [0, 1, 1, 1], [f"v{i}" for i in range(4)], 1)
    assert out["top1"] == pytest.approx(0.5)  # videos 0 (label 0) and 3 (label 1) right
    assert out["mean_class_accuracy"] == pytest.approx((1.0 + 1 / 3) / 2)  # class 0: 1/1, class 1: 1/3


def test_topk_clipped_to_number_of_classes():
    acc = ScoreAccumulator(2, 3)
    acc.add(torch.tensor([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0]]), torch.tensor([0, 1]))
    out = summarize(acc, [2, 0], ["a", "b"], 1)
    assert out["top5"] == 1.0 and out["top1"] == 0.5


def test_one_view_per_video():
    # 7 classes, so top-5 can miss; rows arrive out of video order and must still land on their own video.
    orders = {
        0: [3, 0, 1, 2, 4, 5, 6],  # label 3 ranked 1st: top-1 and top-5 right
        1: [1, 2, 3, 4, 5, 6, 0],  # label 0 ranked 7th: both wrong
        2: [6, 5, 4, 3, 2, 1, 0],  # label 2 ranked 5th: top-5 right, top-1 wrong
        3: [0, 1, 2, 3, 4, 5, 6],  # label 0 ranked 1st: both right
        4: [1, 3, 0, 2, 4, 5, 6],  # label 3 ranked 2nd: top-5 right, top-1 wrong
    }
    labels = [3, 0, 2, 0, 3]
    arrival = [2, 4, 0, 3, 1]
    acc = ScoreAccumulator(5, 7)
    acc.add(torch.stack([_one_hot_logits(orders[v], 7) for v in arrival]), torch.tensor(arrival))
    out = summarize(acc, labels, ["a", "b", "c", "d", "e"], 1)
    # top-1: videos 0, 3 of 5; top-5: all but video 1; per class: 3 -> 1/2, 0 -> 1/2, 2 -> 0/1.
    assert out == {"top1": 2 / 5, "top5": 4 / 5, "mean_class_accuracy": (1 / 2 + 1 / 2 + 0) / 3, "num_videos": 5,
                   "num_scored": 5, "unscored": [], "partially_scored": []}


def test_unreadable_video_is_unscored_and_not_counted():
    acc = ScoreAccumulator(3, 3)
    acc.add(torch.tensor([[5.0, 0, 0], [5.0, 0, 0], [0, 0, 5.0], [0, 0, 5.0]]), torch.tensor([0, 0, 2, 2]))
    acc.add_failures([Failure(1, "broken.mp4", "cannot open"), Failure(1, "broken.mp4", "cannot open (view 1)")])
    out = summarize(acc, [0, 1, 2], ["ok0.mp4", "broken.mp4", "ok2.mp4"], 2)
    assert out["num_scored"] == 2 and out["num_videos"] == 3
    assert out["top1"] == 1.0 and out["mean_class_accuracy"] == 1.0  # class 1 has no scored video
    assert len(out["unscored"]) == 1
    path, reason = out["unscored"][0]
    assert path == "broken.mp4" and "cannot open" in reason
    assert out["partially_scored"] == []


def test_partially_scored_video_is_listed_and_scored_on_its_views():
    acc = ScoreAccumulator(2, 2)
    # video 0: 2 of 2 views; video 1: 1 of 2 views (the other failed)
    acc.add(torch.tensor([[2.0, 0], [2.0, 0], [0, 2.0]]), torch.tensor([0, 0, 1]))
    acc.add_failures([Failure(1, "half.mp4", "truncated")])
    out = summarize(acc, [0, 1], ["full.mp4", "half.mp4"], 2)
    assert out["num_scored"] == 2 and out["top1"] == 1.0
    assert out["unscored"] == []
    assert out["partially_scored"] == [("half.mp4", 1, "truncated")]


def test_gather_without_process_group_is_identity():
    acc = ScoreAccumulator(2, 3)
    acc.add(torch.randn(4, 3), torch.tensor([0, 1, 1, 0]))
    acc.add_failures([Failure(1, "x", "bad")])
    out = gather(acc)
    assert torch.equal(out.scores, acc.scores) and torch.equal(out.counts, acc.counts)
    assert out.failures == [(1, "x", "bad")]


# --------------------------------------------------------------------------
# 2 ranks (gloo) versus 1 process
# --------------------------------------------------------------------------

NUM_VIDEOS, TEMPORAL, CROPS, CLASSES = 7, 2, 3, 5
BROKEN = {3: {0, 1}, 5: {1}}  # video -> temporal views that fail (3 unreadable, 5 partially scored)
LABELS = [v % CLASSES for v in range(NUM_VIDEOS)]
PATHS = [f"video{v}.mp4" for v in range(NUM_VIDEOS)]


def _score_items(items) -> ScoreAccumulator:
    """Score EvalClips-style items (item = temporal view i % K of video i // K) with fixed fake logits."""
    acc = ScoreAccumulator(NUM_VIDEOS, CLASSES)
    for item in items:
        video, view = divmod(item, TEMPORAL)
        if view in BROKEN.get(video, ()):
            acc.add_failures([Failure(video, PATHS[video], f"decode error in view {view}")])
            continue
        logits = torch.randn(CROPS, CLASSES, generator=torch.Generator().manual_seed(item)) * 3
        acc.add(logits, torch.full((CROPS,), video))
    return acc


def _rank_main(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        sampler = ResumableDistributedSampler(NUM_VIDEOS * TEMPORAL, world, rank, shuffle=False, pad=False)
        acc = gather(_score_items(list(sampler)))
        summary = summarize(acc, LABELS, PATHS, TEMPORAL * CROPS)
        torch.save({"summary": summary, "counts": acc.counts, "scores": acc.scores},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.e2e
def test_two_ranks_give_the_same_summary_as_one_process(tmp_path):
    mp.spawn(_rank_main, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    single = gather(_score_items(range(NUM_VIDEOS * TEMPORAL)))
    expected = summarize(single, LABELS, PATHS, TEMPORAL * CROPS)
    assert expected["unscored"] and expected["partially_scored"]  # the example exercises both
    assert expected["num_scored"] == NUM_VIDEOS - 1
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["summary"] == expected
        assert torch.equal(got["counts"], single.counts)
        assert torch.allclose(got["scores"], single.scores, rtol=0, atol=1e-12)


def test_columns_score_each_classifier_as_it_would_be_scored_alone():
    """A grid of classifiers scored in one pass (logits (N, columns, C)): column j summarizes exactly as an
    accumulator fed only classifier j's logits."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(9, 3, CLASSES, generator=generator) * 3
    videos = torch.tensor([0, 0, 1, 1, 1, 2, 4, 4, 6])
    together = ScoreAccumulator(NUM_VIDEOS, CLASSES, columns=3)
    together.add(logits, videos)
    together.add_failures([Failure(3, PATHS[3], "unreadable")])
    for j in range(3):
        alone = ScoreAccumulator(NUM_VIDEOS, CLASSES)
        alone.add(logits[:, j], videos)
        alone.add_failures([Failure(3, PATHS[3], "unreadable")])
        assert summarize(together.column(j), LABELS, PATHS, 2) == summarize(alone, LABELS, PATHS, 2)
    with pytest.raises(ValueError, match="do not match"):
        together.add(logits[:, 0], videos)
