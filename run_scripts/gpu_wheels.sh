#!/usr/bin/env bash
# Fills .whl/ (git-ignored, repository root) with every wheel the GPU machine lacks, for CPython 3.12 on
# manylinux x86_64. That machine has no network: its image already holds torch, timm, transformers and the rest
# (run_scripts/gpu_image_packages.txt), and it installs what travels in .whl/ with the command printed last.
#
#   bash run_scripts/gpu_wheels.sh           fetch/build what is missing, drop stale wheels, check the set
#   bash run_scripts/gpu_wheels.sh --check   only check an existing .whl/ (requirements, tags, one version each, size)
#   bash run_scripts/gpu_wheels.sh --plan    print NAME==VERSION and how each is obtained; needs no network
#
# Versions of our direct dependencies come from constraints.txt, so the GPU machine runs what CI tests.
# Re-running is cheap: a wheel already in .whl/ at the planned version is neither fetched nor rebuilt.
#
# Environment knobs:
#   PYTHON=/path/to/python   interpreter that downloads and builds (default: <repo>/.venv/bin/python); building
#                            DeepSpeed needs torch importable there
#   WHL_DIR=/path            where the wheels go (default: <repo>/.whl)
#   WHL_LIMIT_MIB=55         largest total allowed: the GPU machine receives .whl/ together with the
#                            repository, 64 MiB in all
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
constraints=$root/run_scripts/constraints.txt
image_list=$root/run_scripts/gpu_image_packages.txt
whl=${WHL_DIR:-$root/.whl}
limit_mib=${WHL_LIMIT_MIB:-55}
if [[ -n ${PYTHON:-} ]]; then
    python=$PYTHON
elif [[ -x $root/.venv/bin/python ]]; then
    python=$root/.venv/bin/python
else
    python=python3
fi

mode=all
case ${1:-} in
    "") ;;
    --check) mode=check ;;
    --plan) mode=plan ;;
    -h|--help) sed -n '2,18p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_wheels: unknown argument '$1' (use --check, --plan or nothing)" >&2; exit 2 ;;
esac

# Wheel file names and requirements spell a name in several ways (tensorboardX, pydantic_core); compare them as
# PEP 503 names.
norm() { tr '[:upper:]' '[:lower:]' <<<"$1" | sed -E 's/[-_.]+/-/g'; }

# The version constraints.txt pins for NAME; a missing pin is an error, never a silent "latest".
pin() {
    local want line name
    want=$(norm "$1")
    while IFS= read -r line; do
        line=${line%%#*}
        [[ $line == *==* ]] || continue
        name=$(norm "$(tr -d '[:space:]' <<<"${line%%==*}")")
        if [[ $name == "$want" ]]; then
            tr -d '[:space:]' <<<"${line#*==}"
            return 0
        fi
    done <"$constraints"
    echo "gpu_wheels: $1 has no NAME==VERSION line in $constraints" >&2
    return 1
}

# NAME VERSION HOW, one a line. HOW: binary (a published wheel), sdist (built here, must come out pure Python),
# deepspeed (built here without compiled ops).
plan() {
    local entry name version
    # Our direct dependencies that the image lacks, at the versions CI tests. fairscale is published as a source
    # archive only; omegaconf 2.4 needs only PyYAML (no antlr4 runtime any more).
    for entry in deepspeed:deepspeed fairscale:sdist decord:binary av:binary tensorboardX:binary omegaconf:binary; do
        name=${entry%%:*}
        version=$(pin "$name") || return 1
        echo "$name $version ${entry#*:}"
    done
    # What those require and the image lacks, at the versions CI's environment resolved with constraints.txt.
    # pydantic pins pydantic-core exactly; the check at the end verifies every such requirement against .whl/.
    # The image has typing-extensions at a version nobody read there, and pydantic needs >= 4.16.0; that package
    # only ever adds names, so carrying the newer one cannot break the image's users.
    cat <<'EOF'
hjson 3.1.0 binary
pydantic 2.14.4 binary
pydantic-core 2.50.5 binary
annotated-types 0.8.0 binary
typing-inspection 0.4.5 binary
typing-extensions 4.16.0 binary
EOF
}

# Every manylinux x86_64 tag up to glibc 2.28 (pip matches each given platform exactly, so list them all,
# legacy aliases included). The image is far newer than glibc 2.28.
platforms=(manylinux2014_x86_64 manylinux2010_x86_64 manylinux1_x86_64)
for n in $(seq 28 -1 5); do platforms+=("manylinux_2_${n}_x86_64"); done
target_args=(--python-version 3.12 --implementation cp)
for p in "${platforms[@]}"; do target_args+=(--platform "$p"); done

# Checks a folder of wheels as the GPU machine will use it. Every Requires-Dist that applies to CPython 3.12 on
# Linux x86_64 without extras must be met by a wheel here (name and version) or by the image (name, and version
# where known); each wheel must fit CPython 3.12 manylinux x86_64, hold one version per package, and the total
# must fit the size limit. Prints each problem and exits 1 if there is any.
check() {
    "$python" - "$whl" "$image_list" "$limit_mib" "${platforms[@]}" <<'PY'
import email.parser
import pathlib
import re
import sys
import zipfile

from packaging import tags
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

folder, image_list, limit_mib, platforms = pathlib.Path(sys.argv[1]), sys.argv[2], float(sys.argv[3]), sys.argv[4:]
env = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
       "implementation_version": "3.12.3", "platform_python_implementation": "CPython", "os_name": "posix",
       "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64", "extra": ""}
supported = set(tags.cpython_tags((3, 12), platforms=platforms))
supported |= set(tags.compatible_tags((3, 12), interpreter="cp312", platforms=platforms))

image = {}
for line in pathlib.Path(image_list).read_text().splitlines():
    line = line.split("#", 1)[0].strip()
    if line:
        name, _, version = line.partition("==")
        image[canonicalize_name(name)] = Version(version) if version else None

problems, wheels, total = [], {}, 0
for path in sorted(folder.glob("*.whl")):
    total += path.stat().st_size
    name, version, _, wheel_tags = parse_wheel_filename(path.name)
    if name in wheels:
        problems.append(f"{name}: two versions, {wheels[name][0]} and {version}")
    if not wheel_tags & supported:
        problems.append(f"{path.name}: no tag that CPython 3.12 on manylinux x86_64 installs")
    with zipfile.ZipFile(path) as archive:
        metadata = [n for n in archive.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)]
        if len(metadata) != 1:
            problems.append(f"{path.name}: no single .dist-info/METADATA")
            continue
        meta = email.parser.BytesParser().parsebytes(archive.read(metadata[0]), headersonly=True)
    wheels[name] = (version, meta)

for name, (version, meta) in sorted(wheels.items()):
    requires_python = meta.get("Requires-Python")
    if requires_python and not SpecifierSet(requires_python).contains("3.12.3"):
        problems.append(f"{name} {version}: Requires-Python {requires_python} excludes 3.12")
    for text in meta.get_all("Requires-Dist") or []:
        req = Requirement(text)
        # Markers decide; "extra" is empty, so optional groups (extra == "dev") never count.
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        dep = canonicalize_name(req.name)
        if dep in wheels:
            have, where = wheels[dep][0], "wheel"
        elif dep in image:
            have, where = image[dep], "image"
        else:
            problems.append(f"{name} {version} requires {req}: neither in {folder.name}/ nor in the image")
            continue
        if have is not None and not req.specifier.contains(have, prereleases=True):
            problems.append(f"{name} {version} requires {req}: the {where} has {dep} {have}")

mib = total / 2**20
print(f"gpu_wheels: {len(wheels)} wheels, {mib:.1f} MiB in {folder}")
if mib > limit_mib:
    problems.append(f"{mib:.1f} MiB of wheels is over the {limit_mib:g} MiB limit")
if not wheels:
    problems.append(f"no wheels in {folder}")
for problem in problems:
    print(f"gpu_wheels: MISSING/WRONG: {problem}")
sys.exit(1 if problems else 0)
PY
}

usage_line() {
    echo "on the GPU machine: python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade" \
         "--target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site"
}

# Compute the plan before touching anything: a missing pin must stop us with .whl/ untouched.
plan_text=$(plan)
if [[ $mode == plan ]]; then
    while read -r name version how; do echo "$name==$version $how"; done <<<"$plan_text"
    exit 0
fi
if [[ $mode == check ]]; then
    [[ -d $whl ]] || { echo "gpu_wheels: $whl does not exist; run without --check first" >&2; exit 1; }
    check
    usage_line
    exit 0
fi

mkdir -p "$whl"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# name and version of a wheel file, from its name (the wheel format escapes '-' in both)
wheel_key() {
    local base=${1##*/}
    local rest=${base#*-}
    echo "$(norm "${base%%-*}") ${rest%%-*}"
}

# Drop any wheel that is not in the plan at its planned version: one version per package, nothing left over.
wanted=$(while read -r name version _; do echo "$(norm "$name") $version"; done <<<"$plan_text")
shopt -s nullglob
for f in "$whl"/*.whl; do
    if ! grep -qxF "$(wheel_key "$f")" <<<"$wanted"; then
        echo "gpu_wheels: removing stale ${f##*/}"
        rm -f "$f"
    fi
done

have() {  # is NAME VERSION already in .whl/?
    local f
    for f in "$whl"/*.whl; do
        [[ $(wheel_key "$f") == "$(norm "$1") $2" ]] && return 0
    done
    return 1
}

# Built wheels must be pure Python: the GPU machine runs another Python and torch than this one.
assert_pure() {
    "$python" - "$1" <<'PY'
import sys
import zipfile

path = sys.argv[1]
binaries = [n for n in zipfile.ZipFile(path).namelist() if n.endswith((".so", ".pyd", ".dylib")) or ".so." in n]
if not path.endswith("-none-any.whl") or binaries:
    sys.exit(f"gpu_wheels: {path} is not pure Python: {binaries[:5]}")
PY
}

# DeepSpeed writes what it saw at build time into deepspeed/git_version_info_installed.py. Its torch version
# is only checked when loading an op compiled at install time; with every op False here, ops are JIT-compiled
# on first use against the torch that runs them, so a different torch there is fine. Show it and insist on it.
show_deepspeed_build() {
    "$python" - "$1" <<'PY'
import ast
import sys
import zipfile

text = zipfile.ZipFile(sys.argv[1]).read("deepspeed/git_version_info_installed.py").decode()
print("gpu_wheels: deepspeed records:\n  " + text.strip().replace("\n", "\n  "))
installed = {}
for node in ast.parse(text).body:
    if isinstance(node, ast.Assign) and node.targets[0].id == "installed_ops":
        installed = ast.literal_eval(node.value)
compiled = [op for op, built in installed.items() if built]
if compiled:
    sys.exit(f"gpu_wheels: deepspeed was built with compiled ops {compiled}; they would be tied to this torch")
PY
}

# The single wheel a pip command left in $tmp/out.
new_wheel() {
    local out=("$tmp"/out/*.whl)
    if [[ ${#out[@]} -ne 1 ]]; then
        echo "gpu_wheels: expected one wheel for $1, got: ${out[*]:-none}" >&2
        return 1
    fi
    echo "${out[0]}"
}

pip=("$python" -m pip --disable-pip-version-check)
# The plan comes in on descriptor 3, so that nothing run inside the loop can read it from standard input.
while read -r name version how <&3; do
    if have "$name" "$version"; then
        continue
    fi
    rm -rf "$tmp/out"
    case $how in
        binary)
            "${pip[@]}" download -q --no-deps --only-binary=:all: "${target_args[@]}" -d "$tmp/out" \
                "$name==$version"
            ;;
        sdist|deepspeed)
            # No build isolation: the build uses this interpreter's setuptools and torch, and nothing else is
            # fetched. No cache: a wheel cached from another build (with ops, say) must not be reused.
            # DS_ACCELERATOR=cpu makes the recorded build the same whether or not this machine has a GPU.
            DS_BUILD_OPS=0 DS_ACCELERATOR=cpu BUILD_CUDA_EXTENSIONS=0 \
                "${pip[@]}" wheel -q --no-deps --no-build-isolation --no-cache-dir --no-binary=:all: \
                -w "$tmp/out" "$name==$version" >"$tmp/build.log" 2>&1 \
                || { cat "$tmp/build.log" >&2; echo "gpu_wheels: building $name failed" >&2; exit 1; }
            built=$(new_wheel "$name")
            assert_pure "$built"
            if [[ $how == deepspeed ]]; then
                show_deepspeed_build "$built"
            fi
            ;;
        *) echo "gpu_wheels: unknown way '$how' to get $name" >&2; exit 1 ;;
    esac
    got=$(new_wheel "$name")
    mv "$got" "$whl/"
    echo "gpu_wheels: added ${got##*/}"
done 3<<<"$plan_text"

# What the GPU machine will see: every planned wheel installs for CPython 3.12 on manylinux x86_64, together,
# from .whl/ alone. (--no-deps: torch and the rest come from the image; check() covers requirements.) No pip
# configuration may add other places to look, or a wheel missing here could be found elsewhere.
specs=$(while read -r name version _; do echo "$name==$version"; done <<<"$plan_text")
# shellcheck disable=SC2086  # one word per requirement
PIP_CONFIG_FILE=/dev/null "${pip[@]}" --isolated install -q --dry-run --no-index --no-deps --only-binary=:all: \
    "${target_args[@]}" --find-links "$whl" --target "$tmp/site" $specs
echo "gpu_wheels: all $(wc -l <<<"$specs") planned wheels install together for CPython 3.12 manylinux x86_64"

ls -l "$whl" | awk 'NR > 1 { printf "  %8.2f MiB  %s\n", $5 / 1048576, $9 }'
check
usage_line
