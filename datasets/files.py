"""Files that appear whole or not at all: written under a temporary name in the same folder, then renamed."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Union

PARTIAL = ".partial"  # the marker in a file name that is still being written: readers skip such files


def partial_path(path: Union[str, os.PathLike], *, keep_suffix: bool = False) -> Path:
    """The temporary name ``atomic_path`` writes ``path`` under: ``.name.partial``, or ``stem.partial.ext`` with
    ``keep_suffix``. Exposed so that cleanup code removes exactly what a killed writer can leave behind."""
    path = Path(path)
    return path.with_name(f"{path.stem}{PARTIAL}{path.suffix}" if keep_suffix else f".{path.name}{PARTIAL}")


@contextlib.contextmanager
def atomic_path(path: Union[str, os.PathLike], *, keep_suffix: bool = False, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without an error, the file written there is
    flushed to disk (unless ``fsync=False``) and renamed to ``path`` (a reader, or a run resumed after a crash,
    never sees half a file); after an error it is removed. ``keep_suffix`` keeps the extension last
    (``clip.partial.mp4``) for writers that pick the format from it."""
    path = Path(path)
    tmp = partial_path(path, keep_suffix=keep_suffix)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_text_atomic(path: Union[str, os.PathLike], text: str, *, fsync: bool = True) -> Path:
    """Write ``text`` to ``path`` through ``atomic_path``; returns the path."""
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
