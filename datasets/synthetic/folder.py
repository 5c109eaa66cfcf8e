"""The lifecycle of a generated dataset's folder, one for every generator.

A generator writes its files, then its marker (``meta.json``: the generator's version, the spec, counts) last. A
folder is complete when its marker names this generator version and exactly the spec asked for, and every file
the generator promises is there; anything else is regenerated from the spec: the marker goes first (from then on
the folder reads as incomplete), then every file the generator writes -- and only those, never anything else a
user put there. Files are written whole or not at all, without a sync each (a folder left incomplete by a crash is
generated again), the marker included.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Optional

from datasets.files import write_text_atomic

MARKER = "meta.json"


def spec_json(spec: Any) -> dict:
    """The spec dataclass as it reads back from the marker (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(spec)))


def write_lines(path: Path, lines: Iterable[str]) -> None:
    """``lines`` as a text file, each ended by a newline; a reader never sees half of it."""
    write_text_atomic(path, "".join(line + "\n" for line in lines), fsync=False)


def read_marker(root: Path) -> Optional[dict]:
    try:
        return json.loads((root / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_marker(root: Path, meta: dict) -> None:
    """The marker, written last: the folder reads as complete from here on."""
    write_text_atomic(root / MARKER, json.dumps(meta, indent=2, sort_keys=True) + "\n", fsync=False)


def is_complete(root: Path, version: int, spec: Any, files: Iterable[Path]) -> bool:
    """Whether ``root`` holds a finished dataset of exactly ``spec`` by generator ``version``, with all ``files``."""
    meta = read_marker(root)
    return (meta is not None and meta.get("generator_version") == version and meta.get("spec") == spec_json(spec)
            and all(path.is_file() for path in files))


def invalidate(root: Path) -> None:
    """Remove the marker first: whatever is cleared after it, the folder already reads as incomplete."""
    (root / MARKER).unlink(missing_ok=True)


def remove_matching(folder: Path, name: re.Pattern, remove_if_empty: bool = True) -> None:
    """Delete the files of ``folder`` whose names ``name`` matches whole (a generator's own files and their
    temporary names), then the folder itself when nothing else is left in it."""
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if name.fullmatch(path.name):
            path.unlink()
    if remove_if_empty and not any(folder.iterdir()):
        folder.rmdir()
