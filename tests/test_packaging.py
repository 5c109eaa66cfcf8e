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


# ---- the rooms of engine/ (README "Layout") ---------------------------------------------------------------------


def _imported_modules(path: pathlib.Path) -> set[str]:
    """Every module ``path`` imports, at its top or inside a function."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def _engine_files(*parts: str) -> list[pathlib.Path]:
    return sorted(ROOT.joinpath("engine", *parts).glob("*.py"))


@pytest.mark.parametrize("path", _engine_files("tasks"), ids=lambda p: p.name)
def test_a_task_never_imports_another_task(path):
    tasks = {f"engine.tasks.{p.stem}" for p in _engine_files("tasks")} - {"engine.tasks.__init__"}
    assert not _imported_modules(path) & tasks


@pytest.mark.parametrize("path", _engine_files() + _engine_files("eval"), ids=lambda p: p.name)
def test_the_platform_and_evaluation_never_import_a_task(path):
    assert not any(name.startswith("engine.tasks") for name in _imported_modules(path))


@pytest.mark.parametrize("package", ["datasets", "models"])
def test_datasets_and_models_never_import_the_engine(package):
    for path in sorted((ROOT / package).rglob("*.py")):
        assert not any(name.split(".")[0] == "engine" for name in _imported_modules(path)), path


def test_every_collective_is_in_engine_dist():
    """Only engine/dist.py touches torch.distributed: the rest asks it for an agreement (a sum, every rank's list)."""
    for path in sorted((ROOT / "engine").rglob("*.py")):
        if path != ROOT / "engine" / "dist.py":
            assert not any(name.startswith("torch.distributed") for name in _imported_modules(path)), path


def test_the_platform_stays_small():
    assert len(_engine_files()) <= 14, [p.name for p in _engine_files()]
