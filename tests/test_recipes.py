"""Every recipe under run_scripts/configs/ loads strictly and holds only differences from the defaults."""

import pathlib

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
