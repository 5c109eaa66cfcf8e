"""Shared test setup: the suite runs on CPU in a few minutes; GPU tests are marked and skip themselves."""

import pytest
import torch

# What a launcher sets; removed for in-process DeepSpeed engines, which then see a plain 1-rank launch.
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
               "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped where there is none")


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
