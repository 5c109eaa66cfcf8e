"""The resumable distributed sampler: shares, padding, determinism and mid-epoch resume."""

import pytest

from datasets.sampler import ResumableDistributedSampler


def shares(n, world, **kwargs):
    return [list(ResumableDistributedSampler(n, world, rank, **kwargs)) for rank in range(world)]


def test_padded_shares_are_equal_and_cover_everything():
    parts = shares(10, 4, seed=3)
    assert [len(p) for p in parts] == [3, 3, 3, 3]
    assert set(sum(parts, [])) == set(range(10))


def test_unpadded_shares_score_each_index_exactly_once():
    parts = shares(10, 4, seed=3, pad=False)
    assert sorted(sum(parts, [])) == list(range(10))
    assert [len(p) for p in parts] == [3, 3, 2, 2]


def test_order_depends_on_seed_and_epoch_only():
    a, b = ResumableDistributedSampler(50, seed=1), ResumableDistributedSampler(50, seed=1)
    assert list(a) == list(b)
    b.set_epoch(1)
    assert list(a) != list(b)
    assert list(ResumableDistributedSampler(50, seed=2)) != list(a)
    assert list(ResumableDistributedSampler(5, shuffle=False)) == [0, 1, 2, 3, 4]


def test_resume_mid_epoch_continues_the_same_order():
    uninterrupted = ResumableDistributedSampler(23, 2, 1, seed=7)
    uninterrupted.set_epoch(4)
    full = list(uninterrupted)

    first = ResumableDistributedSampler(23, 2, 1, seed=7)
    first.set_epoch(4)
    consumed = 5
    state = first.state_dict(consumed)

    resumed = ResumableDistributedSampler(23, 2, 1, seed=0)
    resumed.load_state_dict(state)
    assert len(resumed) == len(full) - consumed
    assert list(resumed) == full[consumed:]
    # The next epoch starts from its beginning.
    resumed.set_epoch(5)
    assert len(list(resumed)) == len(full)


def test_resume_refuses_another_split():
    state = ResumableDistributedSampler(23, 2, 0).state_dict(3)
    with pytest.raises(ValueError, match="saved for 23 samples on 2 ranks"):
        ResumableDistributedSampler(23, 4, 0).load_state_dict(state)


def test_bad_arguments():
    with pytest.raises(ValueError, match="empty"):
        ResumableDistributedSampler(0)
    with pytest.raises(ValueError, match="rank 2"):
        ResumableDistributedSampler(5, 2, 2)
