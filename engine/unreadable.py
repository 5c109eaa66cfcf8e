"""Videos a training run could not read: each named once, and how many reads failed over every rank.

A worker turns a video it cannot decode into a ``datasets.video_dataset.Failure``; the loop hands every
micro-batch's failures to ``UnreadableLog.add``. At the steps every rank reaches together (logging steps, and
before every checkpoint) all ranks call ``gather``, one all-gather over the CPU group: every rank learns how many
reads failed since the last call, and rank 0 names each file it has not named before -- once in the log with its
reason, and once as a row of ``<output_dir>/unreadable_videos.tsv``::

    path <TAB> reason <TAB> step <TAB> epoch

``step`` is the optimizer step whose micro-batch first held the video (numbered as in ``metrics.jsonl``), ``epoch``
the 0-based epoch (as there). The file is append-only, on disk before the checkpoint that follows, and read back
when a run starts: a resumed run replays the steps after its checkpoint, so what it meets again is not named
twice, and what a killed run had met but not yet written is met again. One field per value: a tab, newline,
carriage return or backslash in a path is written escaped (``\\t``, ``\\n``, ``\\r``, ``\\\\``); whitespace
in a reason is collapsed to single spaces.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from engine.dist import all_gather_objects, cpu_group

log = logging.getLogger("train")

FILE_NAME = "unreadable_videos.tsv"
HEADER = "path\treason\tstep\tepoch"
# Reads and writes keep undecodable bytes of file names as they are (Python's surrogate escapes).
_ENCODING = {"encoding": "utf-8", "errors": "surrogateescape"}
_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
_UNESCAPES = {value[1]: key for key, value in _ESCAPES.items()}


def _escape(path: str) -> str:
    return "".join(_ESCAPES.get(char, char) for char in path)


def _unescape(field: str) -> str:
    return re.sub(r"\\(.)", lambda match: _UNESCAPES.get(match.group(1), match.group(0)), field)


def read_unreadable(output_dir) -> list[dict]:
    """The rows of a run's ``unreadable_videos.tsv``, in the order written: ``{"path", "reason", "step",
    "epoch"}``; [] when there is none. A last row cut short by a kill mid-write is not returned."""
    path = Path(output_dir) / FILE_NAME
    if not path.is_file():
        return []
    lines = path.read_text(**_ENCODING).split("\n")[1:-1]  # no header; the text after the last newline is cut short
    rows = []
    for line in lines:
        field, reason, step, epoch = line.split("\t")
        rows.append({"path": _unescape(field), "reason": reason, "step": int(step), "epoch": int(epoch)})
    return rows


def _drop_cut_row(path: Path) -> None:
    """Cut the file after its last newline: a row a kill left half-written would swallow the next one appended.
    Nothing is lost: the replay after the resume meets that video again. A file cut inside its header goes."""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end == 0:
        path.unlink()
    elif end < len(data):
        os.truncate(path, end)


class UnreadableLog:
    """This rank's failures since the last ``gather``; on rank 0 also the files already named."""

    def __init__(self, output_dir, is_main: bool):
        self.path = Path(output_dir) / FILE_NAME
        self.is_main = is_main
        self.pending: list[tuple[str, str, int, int]] = []  # (path, reason, step, epoch) since the last gather
        self.named: set[str] = set()
        if is_main and self.path.is_file():
            _drop_cut_row(self.path)
            self.named = {row["path"] for row in read_unreadable(output_dir)}

    def add(self, failures, step: int, epoch: int) -> None:
        """Failures (``Failure`` records) of a micro-batch of optimizer step ``step`` (counted from 1)."""
        self.pending += [(failure.path, failure.reason, step, epoch) for failure in failures]

    def gather(self) -> int:
        """Collect every rank's failures since the last call and name the new files on rank 0; returns how many
        reads failed on all ranks together. A collective: call it at the same point on every rank."""
        gathered = all_gather_objects(self.pending, group=cpu_group())  # host-side: the names are host values
        self.pending = []
        failures = sorted((failure for part in gathered for failure in part), key=lambda f: (f[2], f[0]))
        if self.is_main:
            self._name_new(failures)
        return len(failures)

    def _name_new(self, failures: list[tuple[str, str, int, int]]) -> None:
        rows = []
        for path, reason, step, epoch in failures:  # first seen first: a file met twice keeps its first step
            if path in self.named:
                continue
            self.named.add(path)
            field, reason = _escape(path), " ".join(reason.split())
            rows.append(f"{field}\t{reason}\t{step}\t{epoch}\n")
            log.warning("unreadable video at step %d (epoch %d), skipped and listed in %s: %s: %s", step, epoch,
                        FILE_NAME, field, reason)
        if rows:
            self._append(rows)

    def _append(self, rows: list[str]) -> None:
        header = "" if self.path.exists() else HEADER + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", **_ENCODING) as handle:
            handle.write(header + "".join(rows))
            handle.flush()
            os.fsync(handle.fileno())  # before the checkpoint that follows: a node that crashes loses no name
