"""The one protocol of every evaluation split over the ranks: each rank runs its own share of the forwards, the
same number of them on every rank where parameters are partitioned, then the results are gathered (the caller
gathers, with ``engine.dist``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from engine.dist import max_over_ranks


def forwards_in_lockstep(batches: Iterable, count: int, run: Callable[[Any], bool], blank: Callable[[], Any],
                         collective_forward: bool) -> None:
    """The protocol of every evaluation split over the ranks: each rank calls ``run`` on each of its own ``count``
    batches (a count known before any is read); ``run`` returns False for a batch it could not forward (every item
    unreadable). With ``collective_forward`` (parameters partitioned, so that a forward gathers them from every
    rank) every rank runs the same number of forwards: as many as the rank with the most batches, a ``blank()``
    forward standing in wherever a rank has no batch left or could not forward one. The caller gathers the
    results afterwards."""
    rounds = max_over_ranks(count) if collective_forward else count
    iterator = iter(batches)
    for _ in range(rounds):
        batch = next(iterator, None)
        if not (batch is not None and run(batch)) and collective_forward:
            blank()
