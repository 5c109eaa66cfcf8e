"""The repository's generic package names must resolve to this checkout, and models/ must stay single-device."""

import importlib
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["datasets", "models", "engine"])
def test_package_resolves_to_this_repository(name):
    module = importlib.import_module(name)
    assert pathlib.Path(module.__file__).resolve().parent == ROOT / name


def test_setup_installs_only_our_packages():
    setup_text = (ROOT / "setup.py").read_text()
    include = re.search(r"find_packages\(include=\[(.*?)\]\)", setup_text).group(1)
    names = {n.strip().strip('"').split(".")[0] for n in include.split(",")}
    assert names == {"engine", "models", "datasets"}


FORBIDDEN_IN_MODELS = [r"import deepspeed", r"torch\.distributed", r"autocast", r"\.cuda\(", r"GradScaler"]


@pytest.mark.parametrize("path", sorted((ROOT / "models").glob("*.py")), ids=lambda p: p.name)
def test_models_know_nothing_of_processes_or_precision(path):
    text = path.read_text()
    for pattern in FORBIDDEN_IN_MODELS:
        assert not re.search(pattern, text), f"{path.name} uses {pattern}"
