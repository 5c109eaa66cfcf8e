"""Shared test setup: the suite runs on CPU; GPU tests are marked and skip themselves; tests that start processes are
marked ``e2e`` (``pytest -m "not e2e"`` is the fast loop). Helpers for them are in ``helpers.py``."""

import pytest
import torch

# What a launcher sets; removed for in-process DeepSpeed engines, which then see a plain 1-rank launch.
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
               "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped where there is none")
    config.addinivalue_line("markers", "e2e: starts processes (an entry point, torchrun, spawned ranks, Slurm); "
                                       "pytest -m 'not e2e' is the fast loop")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def ds_group():
    """A 1-rank gloo group for the DeepSpeed engines of one test module, with the variables a launcher would set;
    destroyed afterwards, with DeepSpeed's cached backend, so the next module's engines adopt a group of their own."""
    from engine import dist

    if torch.distributed.is_initialized():
        pytest.fail("a process group leaked from an earlier test: every test must destroy the groups it makes")
    with pytest.MonkeyPatch.context() as mp:
        for key in LAUNCH_VARS:
            mp.delenv(key, raising=False)
        launch = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(dist._free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
        for key, value in launch.items():
            mp.setenv(key, value)
        dist.init_distributed(require_group=True)
        import engine.ds as ds

        yield ds
        dist.cleanup()
        import deepspeed.comm.comm
        import deepspeed.utils.groups

        # DeepSpeed caches its backend and the world / data-parallel groups module-wide: forget the destroyed ones.
        deepspeed.comm.comm.cdb = None
        for name in ("_WORLD_GROUP", "_DATA_PARALLEL_GROUP", "_ZERO_PARAM_INTRA_PARALLEL_GROUP"):
            setattr(deepspeed.utils.groups, name, None)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """The synthetic motion dataset (40 videos of 16 frames, 4 classes; a module's own), plus a test list with one
    corrupt video among the real ones."""
    from datasets.synthetic.motion import SyntheticSpec, ensure_synthetic_dataset

    root = tmp_path_factory.mktemp("synthetic")
    ensure_synthetic_dataset(root, SyntheticSpec(num_videos=40, frames=16, num_classes=4))
    (root / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(200))
    lines = (root / "val.csv").read_text().splitlines()
    (root / "test_with_broken.csv").write_text("\n".join(lines[:4] + ["broken.mp4 1"] + lines[4:]) + "\n")
    return root
