"""Checkpoint policy: completion marker, newest complete wins, keep-k pruning, weights export, RNG states."""

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.checkpoint import (
    MARKER,
    checkpoint_root,
    complete_steps,
    export_weights,
    latest_complete,
    load_latest,
    load_weights,
    restore_rng_states,
    rng_states,
    save_checkpoint,
    step_tag,
)


class FakeEngine:
    """Writes and reads a file per tag as DeepSpeed would, and records the calls."""

    def __init__(self):
        self.loaded = []

    def save_checkpoint(self, root, tag, client_state, save_latest):
        assert save_latest is False  # we never rely on DeepSpeed's `latest` file
        directory = Path(root) / tag
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(client_state, directory / "client.pt")

    def load_checkpoint(self, root, tag):
        self.loaded.append(tag)
        return root, torch.load(Path(root) / tag / "client.pt", weights_only=False)


def test_saved_checkpoints_are_complete_and_the_newest_resumes(tmp_path):
    engine = FakeEngine()
    for step in (10, 20):
        save_checkpoint(engine, tmp_path, step, {"step": step})
    assert complete_steps(tmp_path) == [10, 20]
    assert load_latest(engine, tmp_path) == ({"step": 20}, None)
    assert engine.loaded == ["step_20"]


def test_each_rank_gets_its_own_state_back(tmp_path):
    engine = FakeEngine()
    save_checkpoint(engine, tmp_path, 5, {"step": 5}, rank_state={"rng": [1, 2, 3]})
    assert load_latest(engine, tmp_path) == ({"step": 5}, {"rng": [1, 2, 3]})


def test_a_partial_checkpoint_is_ignored(tmp_path):
    engine = FakeEngine()
    save_checkpoint(engine, tmp_path, 10, {"step": 10})
    partial = checkpoint_root(tmp_path) / step_tag(30)
    partial.mkdir()
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"truncated")
    assert latest_complete(tmp_path) == 10
    assert load_latest(engine, tmp_path) == ({"step": 10}, None)


def test_nothing_to_resume(tmp_path):
    assert latest_complete(tmp_path) is None
    assert load_latest(FakeEngine(), tmp_path) is None


def test_keep_last_prunes_old_complete_and_stale_partial_checkpoints(tmp_path):
    engine = FakeEngine()
    root = checkpoint_root(tmp_path)
    save_checkpoint(engine, tmp_path, 1, {})
    (root / step_tag(2)).mkdir()  # killed while saving: older than what follows, so stale
    for step in (3, 4, 5):
        save_checkpoint(engine, tmp_path, step, {})
    (root / step_tag(6)).mkdir()  # newer than every complete one: may still be in progress elsewhere
    save_checkpoint(engine, tmp_path, 7, {}, keep_last=3)
    names = sorted(p.name for p in root.iterdir())
    assert names == ["step_4", "step_5", "step_7"]
    assert all((root / name / MARKER).is_file() for name in names)


def test_keep_last_must_be_at_least_two(tmp_path):
    with pytest.raises(ValueError, match="keep_last must be >= 2"):
        save_checkpoint(FakeEngine(), tmp_path, 1, {}, keep_last=1)


@pytest.mark.parametrize("name", ["weights.pt", "weights.safetensors"])
def test_exported_weights_reload_safely(tmp_path, name):
    state = {"a.weight": torch.randn(3, 4, dtype=torch.bfloat16), "b": torch.arange(5.0)[::2]}
    path = export_weights(state, tmp_path / "out" / name)
    loaded = load_weights(path)
    assert loaded.keys() == state.keys()
    assert loaded["a.weight"].dtype == torch.float32
    torch.testing.assert_close(loaded["a.weight"], state["a.weight"].float())
    torch.testing.assert_close(loaded["b"], torch.tensor([0.0, 2.0, 4.0]))
    if name.endswith(".pt"):
        torch.load(path, weights_only=True)  # no pickled objects
    assert [p.name for p in (tmp_path / "out").iterdir()] == [name]  # no temporary file left behind


def test_rng_states_round_trip():
    states = rng_states()
    expected = (random.random(), np.random.rand(), torch.rand(1))
    restore_rng_states(states)
    assert (random.random(), np.random.rand()) == expected[:2]
    assert torch.equal(torch.rand(1), expected[2])
