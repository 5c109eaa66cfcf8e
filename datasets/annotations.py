"""Annotation lists in the formats VideoMAE and VideoMAE V2 users already have, or a plain folder of videos.

Every reader returns ``list[VideoRecord]`` and fails at load time, naming ``file:line``, the offending text and
what was expected, so a bad line never surfaces hours later inside a DataLoader worker.

Line formats (one entry per line; blank lines and lines starting with ``#`` are skipped):

``video``               ``<path> <label>``                   VideoMAE lists; -1 is the unlabeled dummy label
``video_v2``            ``<path> <start> -1``                VideoMAE V2 pre-training lines on videos
``frames_start_total``  ``<frame_dir> <start_idx> <total>``  VideoMAE V2 pre-training lines on raw frames
``frames_total_label``  ``<frame_dir> <total> <label>``      VideoMAE SSv2 raw-frame lists

The columns are split off from the right, so paths may contain spaces. The last three formats all look like
``<text> <int> <int>``; nothing in a line tells them apart, which is why the format is always named explicitly.

Relative paths are joined with ``data_root`` (VideoMAE's data prefix), or with the current directory when there
is none, as VideoMAE does; records always hold absolute paths.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from typing import Literal, Optional, get_args

from datasets.files import PARTIAL

AnnotationFormat = Literal["video", "video_v2", "frames_start_total", "frames_total_label"]
FORMATS: tuple[str, ...] = get_args(AnnotationFormat)

UNLABELED = -1
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov")


class AnnotationError(ValueError):
    """A list file (or folder) that cannot be turned into records; the message names file:line."""


class MissingAnnotationList(AnnotationError, FileNotFoundError):
    """A list file that is not there: the user's mistake, told in one line like any other annotation error."""


@dataclass(frozen=True)
class VideoRecord:
    """One sample: a video file, or a folder of frames.

    ``start`` (a 0-based offset into the folder's frame numbering) and ``num_frames`` only matter for frame
    folders; the video decoders ignore them. ``source`` is ``"file:line"`` for messages.
    """

    path: str
    label: int = UNLABELED
    start: int = 0
    num_frames: Optional[int] = None
    source: str = ""


# Integer columns after the path, and how an error message describes a well-formed line.
_COLUMNS: dict[str, tuple[str, ...]] = {
    "video": ("label",),
    "video_v2": ("start", "total"),
    "frames_start_total": ("start", "total"),
    "frames_total_label": ("total", "label"),
}
_EXPECTED: dict[str, str] = {
    "video": "'<path> <label>' with an integer label",
    "video_v2": "'<path> <start> -1' with integer columns",
    "frames_start_total": "'<frame_dir> <start_idx> <total_frames>' with integer columns",
    "frames_total_label": "'<frame_dir> <total_frames> <label>' with integer columns",
}
_UNLABELED_FORMATS = ("video_v2", "frames_start_total")


class _BadValue(Exception):
    """A well-formed line whose numbers make no sense; carries (problem, expectation) for the message."""

    def __init__(self, problem: str, expected: str):
        super().__init__(problem, expected)
        self.problem, self.expected = problem, expected


# --------------------------------------------------------------------------- #
# Entry point
# --------------------------------------------------------------------------- #
def read_annotations(path_or_dir: str | os.PathLike, *, format: AnnotationFormat = "video",
                     data_root: str | os.PathLike | None = None,
                     num_classes: int | None = None) -> list[VideoRecord]:
    """Records from a list file in ``format``, or from a recursive scan when ``path_or_dir`` is a folder."""
    path = os.fspath(path_or_dir)
    if format not in FORMATS:
        raise ValueError(f"unknown annotation format {format!r}; expected one of {', '.join(FORMATS)}")
    if num_classes is not None and num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if os.path.isdir(path):
        return _read_folder_scan(path, format=format, data_root=data_root, num_classes=num_classes)
    if not os.path.isfile(path):
        raise MissingAnnotationList(f"annotation list {path} does not exist")
    if num_classes is not None and format in _UNLABELED_FORMATS:
        raise ValueError(f"format {format!r} carries no labels, so num_classes={num_classes} cannot be checked")
    return read_list_file(path, format=format, data_root=data_root, num_classes=num_classes)


def _read_folder_scan(directory: str, *, format: str, data_root, num_classes) -> list[VideoRecord]:
    # A folder is only ever a scan for videos: refuse options that would otherwise be silently ignored.
    if format != "video":
        raise ValueError(f"{directory} is a folder, scanned for videos; format={format!r} applies to list files")
    if data_root:
        raise ValueError(f"{directory} is a folder, scanned for videos; data_root applies to list files")
    if num_classes is not None:
        raise ValueError(f"a folder scan ({directory}) yields unlabeled videos; num_classes does not apply")
    return scan_video_folder(directory)


# --------------------------------------------------------------------------- #
# List files
# --------------------------------------------------------------------------- #
def read_list_file(path: str, *, format: AnnotationFormat = "video", data_root: str | os.PathLike | None = None,
                   num_classes: int | None = None) -> list[VideoRecord]:
    """Parse every entry of one list file; the first malformed line raises ``AnnotationError``."""
    records = [
        parse_line(text, format=format, data_root=data_root, num_classes=num_classes, source=f"{path}:{number}")
        for number, text in _entry_lines(path)
    ]
    if not records:
        raise AnnotationError(f"{path}: no entries (the file holds only blank or comment lines)")
    return records


def _entry_lines(path: str):
    """(1-based line number, stripped text) of each line that is neither blank nor a comment."""
    try:
        # utf-8-sig: lists saved on Windows often start with a byte-order mark that would end up in the path.
        with open(path, encoding="utf-8-sig") as handle:
            lines = handle.read().splitlines()
    except UnicodeDecodeError as error:
        raise AnnotationError(f"{path}: not UTF-8 text ({error})") from None
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if text and not text.startswith("#"):
            yield number, text


def parse_line(text: str, *, format: AnnotationFormat, data_root=None, num_classes: int | None = None,
               source: str = "<line>") -> VideoRecord:
    """One entry line -> ``VideoRecord``; ``source`` ("file:line") prefixes any error message."""
    columns = _COLUMNS[format]
    split = _split_right(text, len(columns))
    values = _as_ints(split[1]) if split else None
    if values is None:
        raise AnnotationError(f"{source}: expected {_EXPECTED[format]}, got {text!r}")
    fields = dict(zip(columns, values))
    try:
        record = _build_record(format, split[0], fields, num_classes)
    except _BadValue as bad:
        raise AnnotationError(f"{source}: {bad.problem}; expected {bad.expected}, got {text!r}") from None
    return dataclasses.replace(record, path=_resolve(record.path, data_root), source=source)


def _split_right(text: str, count: int) -> tuple[str, list[str]] | None:
    """``'my clip.mp4 3'`` -> ``('my clip.mp4', ['3'])``: the last ``count`` tokens, the rest is the path.

    The greedy ``(.*\\S)`` keeps every earlier space inside the path; any run of spaces or tabs separates columns.
    """
    match = re.fullmatch(r"(.*\S)" + r"\s+(\S+)" * count, text)
    return (match.group(1), list(match.groups()[1:])) if match else None


def _as_ints(tokens: list[str]) -> list[int] | None:
    try:
        return [int(token) for token in tokens]
    except ValueError:
        return None


def _build_record(format: str, path: str, fields: dict[str, int], num_classes: int | None) -> VideoRecord:
    """Check the columns' values for ``format``; the record's path is joined with the root by the caller."""
    if format == "video":
        return VideoRecord(path, label=_checked_label(fields["label"], num_classes))
    if format == "video_v2":
        _check_start(fields["start"])
        if fields["total"] != -1:
            raise _BadValue(f"frame count {fields['total']} on a video line",
                            "'-1' (frame count unknown) as the last column; lines with a frame count are "
                            "raw-frame folders: use format='frames_start_total'")
        return VideoRecord(path, start=fields["start"])
    if format == "frames_start_total":
        _check_start(fields["start"])
        _check_total(fields["total"], hint="; '-1' marks a video line: use format='video_v2'")
        return VideoRecord(path, start=fields["start"], num_frames=fields["total"])
    _check_total(fields["total"])
    return VideoRecord(path, label=_checked_label(fields["label"], num_classes), num_frames=fields["total"])


def _checked_label(label: int, num_classes: int | None) -> int:
    if num_classes is not None and not 0 <= label < num_classes:
        what = "unlabeled entry (-1)" if label == UNLABELED else f"label {label} out of range"
        raise _BadValue(what, f"a label in [0, {num_classes}) (num_classes={num_classes})")
    if label < 0 and label != UNLABELED:
        raise _BadValue(f"negative label {label}", "a label >= 0, or -1 for unlabeled")
    return label


def _check_start(start: int) -> None:
    if start < 0:
        raise _BadValue(f"negative start index {start}", "a start index >= 0")


def _check_total(total: int, hint: str = "") -> None:
    if total < 1:
        raise _BadValue(f"frame count {total}", "a frame count >= 1" + hint)


def _resolve(path: str, data_root) -> str:
    # os.path.join keeps an absolute path as it is, so lists of absolute paths work with or without a root.
    joined = os.path.join(os.fspath(data_root), path) if data_root else path
    return os.path.abspath(joined)


# --------------------------------------------------------------------------- #
# Folder scan (unlabeled pre-training, no list file)
# --------------------------------------------------------------------------- #
def scan_video_folder(directory: str | os.PathLike,
                      extensions: tuple[str, ...] = VIDEO_EXTENSIONS) -> list[VideoRecord]:
    """Every video under ``directory`` (recursively, extensions case-insensitive), sorted, label -1."""
    root = os.path.abspath(os.fspath(directory))
    paths = sorted(_walk_files(root), key=lambda p: os.path.relpath(p, root).split(os.sep))
    records = [VideoRecord(path, source=path) for path in paths if _is_video_name(os.path.basename(path), extensions)]
    if not records:
        raise AnnotationError(f"{root}: no videos found (looked for {', '.join(extensions)} in all sub-folders)")
    return records


def _walk_files(root: str):
    """Files under ``root``, following symlinked folders (datasets are often symlink farms) but never a loop."""
    seen: set[str] = set()
    for folder, subfolders, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders.clear()
            continue
        seen.add(real)
        # Hidden entries are junk such as macOS '._clip.mp4' resource forks, which are not videos.
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        yield from (os.path.join(folder, name) for name in files if not name.startswith("."))


def _is_video_name(name: str, extensions: tuple[str, ...]) -> bool:
    lowered = name.lower()
    # datasets.video_io writes '<stem>.partial<ext>' (datasets.files.atomic_path, keep_suffix) and renames it
    # when done: never read a half-written file.
    return lowered.endswith(tuple(extensions)) and f"{PARTIAL}." not in lowered
