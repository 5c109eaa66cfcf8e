"""Every recipe under run_scripts/configs/ loads strictly, and the quick-start smoke run trains."""

import pathlib
import runpy
import sys

import pytest
import yaml

from engine.config import load_config
from engine.pretrain import PretrainConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "run_scripts" / "configs"
ROOT_CONFIG_OF_FOLDER = {"pretrain": PretrainConfig}
RECIPES = sorted(CONFIGS.rglob("*.yaml"))


def test_there_are_recipes():
    assert RECIPES


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_recipe_loads_strictly(path):
    folder = path.relative_to(CONFIGS).parts[0]
    assert folder in ROOT_CONFIG_OF_FOLDER, f"no root config registered for recipes in {folder}/"
    load_config(ROOT_CONFIG_OF_FOLDER[folder], str(path))
    # A recipe holds only differences: none of its values may merely repeat a default.
    defaults = ROOT_CONFIG_OF_FOLDER[folder]()
    assert_no_redundant_values(yaml.safe_load(path.read_text()) or {}, defaults, path.name)


def assert_no_redundant_values(data: dict, defaults, where: str, prefix=""):
    for key, value in data.items():
        default = getattr(defaults, key)
        if isinstance(value, dict) and default is None:
            continue  # an optional section switched on: its presence is the difference
        if isinstance(value, dict):
            assert_no_redundant_values(value, default, where, f"{prefix}{key}.")
        else:
            assert value != default, f"{where}: {prefix}{key} repeats its default"


def test_smoke_run_trains_and_writes_its_config(tmp_path, monkeypatch):
    argv = ["smoke.py", "--config", str(CONFIGS / "pretrain" / "tiny_cpu.yaml"), "--steps=12",
            f"run.output_dir={tmp_path}", f"data.root={tmp_path / 'data'}", "data.synthetic.num_videos=40",
            "data.synthetic.frames=16", "batch.micro_batch=4"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "run_scripts" / "smoke.py"), run_name="__main__")
    assert exit_info.value.code == 0
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["model"]["encoder"]["arch"] == "vit_debug"
    assert yaml.safe_load((tmp_path / "derived.yaml").read_text())["token_grid"] == [4, 4, 4]
