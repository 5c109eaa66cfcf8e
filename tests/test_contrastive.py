"""VIMPAC's InfoNCE (engine/tasks/vimpac.py): against a direct implementation of the paper's eq. 4-5, and two gloo
ranks of B videos against one process of 2B (loss and gradients, with DeepSpeed's averaging of gradients)."""

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.tasks.vimpac import info_nce

VIDEOS, DIM, TEMPERATURE = 6, 5, 0.2


def eq_4_5(a: torch.Tensor, b: torch.Tensor, gamma: float) -> float:
    """The paper's equations with loops, in float64: L_cl = mean_i L(i) + mean_i L'(i)."""
    a = torch.nn.functional.normalize(a.double(), dim=-1)
    b = torch.nn.functional.normalize(b.double(), dim=-1)
    n = len(a)

    def loss(f, f2, i):
        numerator = math.exp(float(f[i] @ f2[i]) / gamma)
        denominator = sum(math.exp(float(f[i] @ f[k]) / gamma) for k in range(n) if k != i)
        denominator += sum(math.exp(float(f[i] @ f2[k]) / gamma) for k in range(n))
        return -math.log(numerator / denominator)

    return sum(loss(a, b, i) for i in range(n)) / n + sum(loss(b, a, i) for i in range(n)) / n


def features(seed: int = 0):
    """Clip inputs of every video and a linear "model" whose weight the gradients are compared on."""
    generator = torch.Generator().manual_seed(seed)
    clips = torch.randn(2, VIDEOS, 8, generator=generator)
    weight = torch.randn(DIM, 8, generator=generator)
    return clips, weight


def test_the_loss_is_the_papers_equations():
    generator = torch.Generator().manual_seed(1)
    a, b = torch.randn(VIDEOS, DIM, generator=generator), torch.randn(VIDEOS, DIM, generator=generator)
    assert abs(info_nce(a, b, TEMPERATURE).item() - eq_4_5(a, b, TEMPERATURE)) < 1e-5
    # a positive pair that agrees more than the negatives lowers the loss
    assert info_nce(a, a + 0.01 * b, TEMPERATURE) < info_nce(a, b, TEMPERATURE)


def _rank_main(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        clips, weight = features()
        weight.requires_grad_(True)
        share = VIDEOS // world
        mine = clips[:, rank * share:(rank + 1) * share]
        loss = info_nce(mine[0] @ weight.T, mine[1] @ weight.T, TEMPERATURE)
        loss.backward()
        grad = weight.grad.clone()
        dist.all_reduce(grad)  # what DeepSpeed does with the gradients of data-parallel ranks: their mean
        losses = [None] * world
        dist.all_gather_object(losses, loss.item())
        torch.save({"loss": sum(losses) / world, "grad": grad / world}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.e2e
def test_two_ranks_of_b_videos_give_the_loss_and_gradients_of_one_process_of_2b(tmp_path):
    mp.spawn(_rank_main, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    clips, weight = features()
    weight.requires_grad_(True)
    loss = info_nce(clips[0] @ weight.T, clips[1] @ weight.T, TEMPERATURE)
    loss.backward()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert abs(got["loss"] - loss.item()) < 1e-5
        torch.testing.assert_close(got["grad"], weight.grad, rtol=1e-4, atol=1e-6)
    # without passing gradients back to the owner of each gathered feature the two would differ
    assert weight.grad.abs().sum() > 0


# ---- the contrastive head's BatchNorm over the global batch ----------------------------------------------------

HEAD_VIDEOS = 8


def head_and_clips():
    """VIMPAC's contrastive head (Linear + BatchNorm + ReLU, then a bias-free Linear) with global BatchNorms, and
    the two clips' inputs of every video, video-major as the task's batches hold them."""
    from engine.tasks.vimpac import global_batch_norms
    from models.vimpac import ContrastiveHead, ContrastiveHeadConfig

    torch.manual_seed(0)
    head = global_batch_norms(ContrastiveHead(6, ContrastiveHeadConfig(layers=2, hidden=12, out_dim=4)))
    clips = torch.randn(2 * HEAD_VIDEOS, 6, generator=torch.Generator().manual_seed(3))
    return head, clips


def head_step(head, clips):
    features = head(clips)
    loss = info_nce(features[0::2], features[1::2], TEMPERATURE)
    loss.backward()
    return loss


def _head_rank_main(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        head, clips = head_and_clips()
        share = 2 * HEAD_VIDEOS // world
        loss = head_step(head, clips[rank * share:(rank + 1) * share])
        grads = {name: p.grad.clone() for name, p in head.named_parameters()}
        for grad in grads.values():
            dist.all_reduce(grad)  # DeepSpeed's mean of the data-parallel gradients
        losses = [None] * world
        dist.all_gather_object(losses, loss.item())
        torch.save({"loss": sum(losses) / world, "grads": {k: g / world for k, g in grads.items()},
                    "buffers": {k: b.clone() for k, b in head.named_buffers()}}, os.path.join(out_dir, f"h{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.e2e
def test_the_heads_batch_norm_makes_two_ranks_one_process(tmp_path):
    mp.spawn(_head_rank_main, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    fresh, clips = head_and_clips()
    reference = torch.nn.BatchNorm1d(12)  # on one rank the global BatchNorm is torch's
    reference.load_state_dict(fresh[1].state_dict())
    hidden = fresh[0](clips)
    torch.testing.assert_close(fresh[1](hidden), reference(hidden))
    torch.testing.assert_close(fresh[1].running_var, reference.running_var)
    head, clips = head_and_clips()
    loss = head_step(head, clips)
    for rank in range(2):
        got = torch.load(tmp_path / f"h{rank}.pt")
        assert abs(got["loss"] - loss.item()) < 1e-5
        for name, p in head.named_parameters():
            torch.testing.assert_close(got["grads"][name], p.grad, rtol=1e-4, atol=1e-6)
        for name, buffer in head.named_buffers():  # running statistics of the whole batch, on every rank
            torch.testing.assert_close(got["buffers"][name], buffer)
