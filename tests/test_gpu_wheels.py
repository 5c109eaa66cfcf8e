"""run_scripts/gpu_wheels.sh: its plan follows constraints.txt, and its check catches what the GPU machine would miss.

Nothing here touches the network or the real .whl/: the check runs on small fake wheels in tmp_path.
"""

import os
import pathlib
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "run_scripts" / "gpu_wheels.sh"
IMAGE_LIST = ROOT / "run_scripts" / "gpu_image_packages.txt"
DIRECT = ["deepspeed", "decord", "av", "tensorboardX", "fairscale", "omegaconf"]
INSTALL = ("python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "
           ".whl/*.whl && export PYTHONPATH=/tmp/site")


def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def run(*args, script=SCRIPT, **env):
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHON": sys.executable, **env})


def pins(path):
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            found[norm(name)] = version.strip()
    return found


def plan():
    result = run("--plan")
    assert result.returncode == 0, result.stderr
    entries = {}
    for line in result.stdout.splitlines():
        spec, how = line.split()
        name, version = spec.split("==")
        assert norm(name) not in entries, f"{name} planned twice"
        entries[norm(name)] = (version, how)
    return entries


def image_names():
    return {norm(line.split("#", 1)[0].split("==")[0].strip())
            for line in IMAGE_LIST.read_text().splitlines() if line.split("#", 1)[0].strip()}


def fake_wheel(folder, name, version, requires=(), tag="py3-none-any", requires_python=None):
    """A wheel holding only its metadata: all the check reads."""
    dist = f"{name.replace('-', '_')}-{version}"
    path = folder / f"{dist}-{tag}.whl"
    meta = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    meta += [f"Requires-Python: {requires_python}"] if requires_python else []
    meta += [f"Requires-Dist: {req}" for req in requires]
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{dist}.dist-info/METADATA", "\n".join(meta) + "\n")
        archive.writestr(f"{dist}.dist-info/WHEEL", f"Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: {tag}\n")
    return path


@pytest.mark.e2e
def test_script_parses():
    result = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.e2e
def test_direct_dependencies_come_at_the_versions_ci_tests():
    planned, constraints = plan(), pins(ROOT / "run_scripts" / "constraints.txt")
    for name in DIRECT:
        assert planned[norm(name)][0] == constraints[norm(name)], name
    assert planned["deepspeed"][1] == "deepspeed"  # built here without compiled ops, never a published binary
    assert planned["fairscale"][1] == "sdist"


@pytest.mark.e2e
def test_a_missing_pin_stops_the_plan(tmp_path):
    scripts = tmp_path / "run_scripts"
    scripts.mkdir()
    shutil.copy(SCRIPT, scripts)
    shutil.copy(IMAGE_LIST, scripts)
    lines = (ROOT / "run_scripts" / "constraints.txt").read_text().splitlines()
    (scripts / "constraints.txt").write_text("\n".join(l for l in lines if not l.startswith("av==")) + "\n")
    result = run("--plan", script=scripts / SCRIPT.name)
    assert result.returncode != 0
    assert "av has no NAME==VERSION" in result.stderr


@pytest.mark.e2e
def test_image_list_is_the_gpu_image_and_we_carry_only_what_it_lacks():
    names = image_names()
    assert {"torch", "timm", "transformers", "numpy", "pyyaml", "einops", "nvidia-ml-py"} <= names
    assert "torch==2.11.0" in IMAGE_LIST.read_text().split()
    # typing-extensions is carried on purpose: pydantic needs a newer one than the image is known to have.
    assert set(plan()) & names == {"typing-extensions"}
    assert not {"deepspeed", "pydantic", "pydantic-core", "hjson", "av", "decord"} & names


@pytest.mark.e2e
def test_check_passes_a_complete_set_and_ends_with_the_install_command(tmp_path):
    fake_wheel(tmp_path, "deepspeed", "0.19.8", ["torch>=2.0.0", "pydantic>=2.0.0", "py-cpuinfo",
                                                 'sphinx; extra == "dev"', 'pywin32; sys_platform == "win32"',
                                                 'tomli; python_version < "3.11"'])
    fake_wheel(tmp_path, "pydantic", "2.14.4", ["pydantic-core==2.50.5", "typing-extensions>=4.16.0"])
    fake_wheel(tmp_path, "pydantic_core", "2.50.5", tag="cp312-cp312-manylinux_2_17_x86_64")
    fake_wheel(tmp_path, "typing_extensions", "4.16.0", requires_python=">=3.9")
    result = run("--check", WHL_DIR=str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1] == f"on the GPU machine: {INSTALL}"


@pytest.mark.e2e
@pytest.mark.parametrize("requires, extra_wheels, expected", [
    (["made-up-missing-package>=1"], [], "made-up-missing-package"),
    (["pydantic-core==2.50.5"], [("pydantic_core", "2.50.4")], "has pydantic-core 2.50.4"),
    (["torch>=99"], [], "the image has torch 2.11.0"),
    (["numpy"], [("hjson", "3.0.0"), ("hjson", "3.1.0")], "hjson: two versions"),
    (["numpy"], [("pydantic_core", "2.50.5", "cp311-cp311-manylinux_2_17_x86_64")], "no tag that CPython 3.12"),
])
def test_check_flags_what_the_gpu_machine_would_miss(tmp_path, requires, extra_wheels, expected):
    fake_wheel(tmp_path, "ours", "1.0", requires)
    for name, version, *tag in extra_wheels:
        fake_wheel(tmp_path, name, version, tag=tag[0] if tag else "py3-none-any")
    result = run("--check", WHL_DIR=str(tmp_path))
    assert result.returncode == 1
    assert expected in result.stdout
    assert INSTALL not in result.stdout


@pytest.mark.e2e
def test_check_flags_python_version_and_size(tmp_path):
    fake_wheel(tmp_path, "ours", "1.0", requires_python=">=3.13")
    result = run("--check", WHL_DIR=str(tmp_path), WHL_LIMIT_MIB="0")
    assert result.returncode == 1
    assert "Requires-Python >=3.13 excludes 3.12" in result.stdout
    assert "over the 0 MiB limit" in result.stdout
