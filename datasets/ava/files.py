"""Readers for the files of AVA v2.x action detection: box CSVs, the action label map, excluded timestamps, and
dense person proposals. Each returns plain numpy-backed structures and fails at load time with an
``AnnotationError`` that names ``file:line`` (or ``file: key`` for a pickle), the offending text and what was
expected, so a bad row is reported before training starts, not inside a DataLoader worker or the evaluator.

Formats (the CSVs have no header; coordinates are normalized to [0, 1] and ordered x1, y1, x2, y2):

``groundtruth`` CSV  ``video_id,timestamp,x1,y1,x2,y2,action_id[,person_id]``  one row per (box, action), so a
                     person with several actions repeats the box
``detections`` CSV   ``video_id,timestamp,x1,y1,x2,y2,[action_id],score``     person-detector boxes leave the
                     action empty; model outputs put one (box, action, score) per row
label map            ``item { name: "..." id: N }`` (``label { ... label_id: N }`` in the full 80-action list)
excluded timestamps  ``video_id,timestamp``                                   keyframes skipped in evaluation
dense proposals      a pickle of ``{"video_id,%04d": float array (N, 4 or 5)}``, the last column a score

A keyframe is addressed as ``"video_id,%04d" % timestamp`` everywhere, the key the official evaluator uses.
"""

from __future__ import annotations

import codecs
import functools
import itertools
import math
import os
import pickle
import re
import sys
from dataclasses import dataclass
from typing import Literal, Optional, get_args

import numpy as np

from datasets.annotations import AnnotationError

CsvKind = Literal["groundtruth", "detections"]
CSV_KINDS: tuple[str, ...] = get_args(CsvKind)

NO_ACTION = -1  # the action of a box without one: an empty action column, or a negative (background) box
NO_PERSON = -1
# Annotators' boxes stray slightly outside the frame (e.g. 1.0002) through rounding; such values are clipped.
# Anything further out is a real error, most often pixel coordinates given where normalized ones are expected.
COORD_TOLERANCE = 1e-3
DEFAULT_MIN_SCORE = 0.8  # VideoMAE's person-detector threshold on AVA (SlowFast's default is 0.9)


# --------------------------------------------------------------------------- #
# The table
# --------------------------------------------------------------------------- #
@dataclass(frozen=True, eq=False)  # eq=False: '==' on numpy fields would be ambiguous, compare fields instead
class BoxTable:
    """Boxes of many keyframes, one row per CSV row (or proposal), as parallel numpy arrays.

    ``boxes`` holds x1, y1, x2, y2 normalized to [0, 1]; ``action`` is ``NO_ACTION`` (-1) where a row has none,
    ``person_id`` is ``NO_PERSON`` (-1) where the file has no such column, and ``score`` is NaN where the file
    has no score (ground truth). ``source`` is the file the rows came from, for messages.
    """

    video_id: np.ndarray  # object array of str
    timestamp: np.ndarray  # int64, seconds
    boxes: np.ndarray  # float32 (N, 4)
    action: np.ndarray  # int64
    person_id: np.ndarray  # int64
    score: np.ndarray  # float32
    source: str = ""

    def __post_init__(self):
        fields = {
            "video_id": np.asarray(self.video_id, dtype=object).reshape(-1),
            "timestamp": np.asarray(self.timestamp, dtype=np.int64).reshape(-1),
            "boxes": np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4),
            "action": np.asarray(self.action, dtype=np.int64).reshape(-1),
            "person_id": np.asarray(self.person_id, dtype=np.int64).reshape(-1),
            "score": np.asarray(self.score, dtype=np.float32).reshape(-1),
        }
        lengths = {name: len(value) for name, value in fields.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"BoxTable fields differ in length: {lengths}")
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    def __len__(self) -> int:
        return len(self.timestamp)

    def keys(self) -> np.ndarray:
        """The keyframe key ``"video_id,%04d"`` of each row (object array of str), as the official evaluator
        and the proposal files spell it."""
        keys = [f"{video},{second:04d}" for video, second in zip(self.video_id.tolist(), self.timestamp.tolist())]
        return np.array(keys, dtype=object).reshape(-1)

    def select(self, mask: np.ndarray) -> "BoxTable":
        """The rows picked by a boolean mask or an index array, in that order."""
        mask = np.asarray(mask)
        if mask.dtype == bool and mask.shape != (len(self),):
            raise ValueError(f"a boolean mask of shape {mask.shape} cannot select from {len(self)} rows")
        return BoxTable(self.video_id[mask], self.timestamp[mask], self.boxes[mask], self.action[mask],
                        self.person_id[mask], self.score[mask], source=self.source)


# --------------------------------------------------------------------------- #
# Box CSVs
# --------------------------------------------------------------------------- #
_CSV_EXPECTED: dict[str, str] = {
    "groundtruth": "'video_id,timestamp,x1,y1,x2,y2,action_id[,person_id]'",
    "detections": "'video_id,timestamp,x1,y1,x2,y2,[action_id],score'",
}
_CSV_WIDTHS: dict[str, tuple[int, ...]] = {"groundtruth": (7, 8), "detections": (8,)}
_INT64_RANGE = (-(2 ** 63), 2 ** 63)


def read_ava_csv(path: str | os.PathLike, *, kind: CsvKind) -> BoxTable:
    """All rows of a ground-truth or detection CSV; the first malformed row raises ``AnnotationError``.

    Columns are converted in bulk and checked with vectorised masks, which keeps the 900k-row training CSV at a
    few seconds; only when that fails is the file walked row by row, so the message names the first bad line.
    Blank lines are skipped; trailing whitespace and CRLF line ends are accepted.
    """
    if kind not in CSV_KINDS:
        raise ValueError(f"unknown AVA CSV kind {kind!r}; expected one of {', '.join(CSV_KINDS)}")
    path = os.fspath(path)
    texts, numbers = _data_lines(path)
    if not texts:
        raise AnnotationError(f"{path}: no rows (the file is empty or blank); expected {_CSV_EXPECTED[kind]}")
    parts = [_parse_chunk(path, texts, numbers, start, kind) for start in range(0, len(texts), _CHUNK_ROWS)]
    video_id, timestamp, coords, action, person_id, score = (np.concatenate(column) for column in zip(*parts))
    return BoxTable(video_id, timestamp, coords, action, person_id, score, source=path)


# Rows converted at a time: bounds the transient per-field strings (about 50 bytes each) to tens of megabytes
# instead of half a gigabyte for the whole training CSV, at no measurable cost in speed.
_CHUNK_ROWS = 1 << 17


def _parse_chunk(path: str, texts: list[str], numbers, start: int, kind: str):
    """The checked, clipped columns of rows [start, start + _CHUNK_ROWS); every earlier row has passed, so the
    first bad row found here is the first in the file."""
    parsed = _parse_columns(texts[start:start + _CHUNK_ROWS], kind)
    if parsed is None:  # a row of the wrong width or a value that is not a number: find the first bad one
        _raise_first_bad_row(path, texts, numbers, start, kind)
    video_id, timestamp, coords, action, person_id, score = parsed
    bad = _bad_values(video_id, timestamp, coords, action, score, kind)
    if bad.any():
        first = start + int(np.argmax(bad))
        _raise_row(path, texts[first], _line_number(numbers, first), kind)
    np.clip(coords, 0.0, 1.0, out=coords)
    return video_id, timestamp, coords, action, person_id, score


def _data_lines(path: str) -> tuple[list[str], Optional[np.ndarray]]:
    """The stripped non-blank lines of ``path`` and their 1-based line numbers (None: no line was skipped, so
    row i is line i + 1, which avoids a second million-entry array in the usual case)."""
    try:
        # utf-8-sig: a file saved on Windows may start with a byte-order mark that would end up in a video id.
        with open(path, encoding="utf-8-sig") as handle:
            text = handle.read()
    except UnicodeDecodeError as error:
        raise AnnotationError(f"{path}: not UTF-8 text ({error})") from None
    lines = list(map(str.strip, text.splitlines()))
    if all(lines):
        return lines, None
    kept = [index for index, line in enumerate(lines) if line]
    return [lines[index] for index in kept], np.asarray(kept, dtype=np.int64) + 1


def _line_number(numbers: Optional[np.ndarray], row: int) -> int:
    return row + 1 if numbers is None else int(numbers[row])


def _parse_columns(texts: list[str], kind: str):
    """Bulk conversion of every column, or None when some row has the wrong width or a non-numeric value.

    The lines are joined and split once into a flat list of fields, so column k is a slice: splitting each line
    into its own list would allocate a million small lists, whose garbage collection alone triples the time.
    """
    count = len(texts)
    widths = np.fromiter(map(str.count, texts, itertools.repeat(",")), dtype=np.int64, count=count) + 1
    allowed = _CSV_WIDTHS[kind]
    if not np.isin(widths, allowed).all():
        return None
    width = max(allowed)
    if (widths != width).any():  # ground truth without a person id: an empty 8th column reads as NO_PERSON
        texts = [text if short == 0 else text + "," * short for text, short in zip(texts, (width - widths).tolist())]
    fields = ",".join(texts).split(",")
    columns = [fields[index::width] for index in range(width)]
    try:
        # Interned: a few hundred distinct videos, not a million equal strings.
        video_id = np.array(list(map(sys.intern, map(str.strip, columns[0]))), dtype=object)
        timestamp = np.fromiter(map(int, columns[1]), dtype=np.int64, count=count)
        coords = np.empty((count, 4), dtype=np.float64)
        for index in range(4):
            coords[:, index] = np.fromiter(map(float, columns[2 + index]), dtype=np.float64, count=count)
        if kind == "groundtruth":
            action = np.fromiter(map(int, columns[6]), dtype=np.int64, count=count)
            persons = [text if text and not text.isspace() else "-1" for text in columns[7]]
            person_id = np.fromiter(map(int, persons), dtype=np.int64, count=count)
            score = np.full(count, np.nan, dtype=np.float32)
        else:
            actions = [text if text and not text.isspace() else "-1" for text in columns[6]]
            action = np.fromiter(map(int, actions), dtype=np.int64, count=count)
            person_id = np.full(count, NO_PERSON, dtype=np.int64)
            score = np.fromiter(map(float, columns[7]), dtype=np.float64, count=count)
    except (ValueError, OverflowError):
        return None
    return video_id, timestamp, coords, action, person_id, score


def _bad_values(video_id, timestamp, coords, action, score, kind: str) -> np.ndarray:
    """Rows whose values are well-formed numbers but make no sense: the same checks as ``_row_problem``, which
    words the message for the first of them."""
    # Written as not-inside rather than outside so that NaN coordinates count as bad.
    outside = ~((coords >= -COORD_TOLERANCE) & (coords <= 1.0 + COORD_TOLERANCE))
    clipped = np.clip(coords, 0.0, 1.0)
    inverted = ~((clipped[:, 0] < clipped[:, 2]) & (clipped[:, 1] < clipped[:, 3]))
    bad = outside.any(axis=1) | inverted | (timestamp < 0) | (video_id == "")
    if kind == "groundtruth":
        return bad | (action < 1)
    return bad | (action == 0) | (action < NO_ACTION) | ~np.isfinite(score)


def _raise_first_bad_row(path: str, texts: list[str], numbers, start: int, kind: str):
    for index in range(start, len(texts)):
        _raise_row(path, texts[index], _line_number(numbers, index), kind, only_if_bad=True)
    # The bulk and row-by-row checks disagree: still name the file rather than fail without a message.
    raise AnnotationError(f"{path}: malformed rows; expected {_CSV_EXPECTED[kind]}")


def _raise_row(path: str, text: str, line: int, kind: str, *, only_if_bad: bool = False):
    problem = _row_problem(text.split(","), kind)
    if problem is None:
        if only_if_bad:
            return
        problem = ("rejected by the bulk checks", _CSV_EXPECTED[kind])
    what, expected = problem
    raise AnnotationError(f"{path}:{line}: {what}; expected {expected}, got {text!r}")


def _row_problem(row: list[str], kind: str) -> Optional[tuple[str, str]]:
    """(problem, expectation) for one split row, or None when it is fine; the single wording of every row
    error, used for the first row the bulk checks reject."""
    layout = _CSV_EXPECTED[kind]
    widths = _CSV_WIDTHS[kind]
    if len(row) not in widths:
        counts = " or ".join(str(width) for width in widths)
        return f"{len(row)} comma-separated columns", f"{counts} columns {layout}"
    if not row[0].strip():
        return "empty video id", layout
    timestamp = _as_int(row[1])
    if timestamp is None:
        return f"timestamp {row[1].strip()!r} is not an integer", "whole seconds such as 0902"
    if timestamp < 0:
        return f"negative timestamp {timestamp}", "whole seconds >= 0"
    coords = [_as_float(value) for value in row[2:6]]
    if None in coords:
        bad = next(value for value, number in zip(row[2:6], coords) if number is None)
        return f"coordinate {bad.strip()!r} is not a number", f"x1,y1,x2,y2 as numbers in [0, 1] ({layout})"
    for name, value in zip(("x1", "y1", "x2", "y2"), coords):
        if not -COORD_TOLERANCE <= value <= 1.0 + COORD_TOLERANCE:
            return (f"{name}={value:g} outside the frame",
                    f"normalized coordinates in [0, 1] (within {COORD_TOLERANCE:g}), not pixels")
    x1, y1, x2, y2 = (min(max(value, 0.0), 1.0) for value in coords)
    if not (x1 < x2 and y1 < y2):
        return "empty or inverted box", "x1 < x2 and y1 < y2 (columns x1,y1,x2,y2)"
    action_text = row[6].strip()
    if kind == "detections" and not action_text:
        action = NO_ACTION
    else:
        action = _as_int(action_text)
        if action is None:
            return f"action id {action_text!r} is not an integer", _action_expectation(kind)
    if action < 1 and not (kind == "detections" and action == NO_ACTION):
        return f"action id {action}", _action_expectation(kind)
    if kind == "groundtruth":
        if len(row) > 7 and row[7].strip() and _as_int(row[7]) is None:
            return f"person id {row[7].strip()!r} is not an integer", "an integer person id, or no 8th column"
        return None
    score = _as_float(row[7])
    if score is None or not math.isfinite(score):
        return f"score {row[7].strip()!r} is not a finite number", f"a detection score in column 8 ({layout})"
    return None


def _action_expectation(kind: str) -> str:
    if kind == "groundtruth":
        return "an action id >= 1 (AVA numbers actions from 1)"
    return "an action id >= 1, or an empty column (or -1) for a box without an action"


def _as_int(text: str) -> Optional[int]:
    try:
        value = int(text)
    except ValueError:
        return None
    return value if _INT64_RANGE[0] <= value < _INT64_RANGE[1] else None


def _as_float(text: str) -> Optional[float]:
    try:
        return float(text)
    except ValueError:
        return None


# --------------------------------------------------------------------------- #
# Filters
# --------------------------------------------------------------------------- #
def filter_detections(table: BoxTable, min_score: float = DEFAULT_MIN_SCORE) -> BoxTable:
    """The rows scored at least ``min_score``; refuses a table without scores, which would silently lose
    every row."""
    if not math.isfinite(min_score):
        raise ValueError(f"min_score must be a finite number, got {min_score}")
    if np.isnan(table.score).any():
        raise ValueError(f"{table.source or 'the table'} has rows without a score (ground truth?): "
                         "only detections can be filtered by score")
    return table.select(table.score >= min_score)


def keep_label_map_actions(table: BoxTable, label_map: dict[int, str], *,
                           keep_unlabeled: bool = False) -> tuple[BoxTable, dict[int, int]]:
    """The rows whose action the label map evaluates, and the dropped rows counted per action id (ascending).

    AVA's ground truth holds 80 actions but the benchmark evaluates the 60 of its label map; rows of the other
    20 must be dropped on both sides, and are counted so that a wrong label map shows instead of quietly
    lowering the mAP. Rows without an action (``NO_ACTION``: detector boxes, negatives) are dropped and counted
    under -1 too, unless ``keep_unlabeled``.
    """
    evaluated = np.isin(table.action, np.fromiter(label_map, dtype=np.int64, count=len(label_map)))
    if keep_unlabeled:
        evaluated |= table.action == NO_ACTION
    ids, counts = np.unique(table.action[~evaluated], return_counts=True)
    return table.select(evaluated), {int(action): int(count) for action, count in zip(ids, counts)}


# --------------------------------------------------------------------------- #
# Label map (.pbtxt)
# --------------------------------------------------------------------------- #
# Protobuf text format as label maps use it: blocks of 'key: value' fields, strings in either quote, '#' comments.
_TOKEN = re.compile(r"""
      (?P<space>[ \t\r\f\v]+)
    | (?P<newline>\n)
    | (?P<comment>\#[^\n]*)
    | (?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
    | (?P<number>[-+]?[0-9][\w.]*)
    | (?P<word>[A-Za-z_]\w*)
    | (?P<punct>[{}<>:])
""", re.VERBOSE)
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", "'": "'", '"': '"'}
_BLOCKS = ("item", "label")  # 'item' in the evaluated 60-action lists, 'label' in the full 80-action list
_ID_KEYS = ("id", "label_id")
# Fields a label map may carry besides name and id; read and ignored, while any other key is an error.
_IGNORED_KEYS = ("display_name", "label_type")


def read_label_map(path: str | os.PathLike) -> dict[int, str]:
    """Action id -> name, in file order, from an AVA ``.pbtxt`` label map.

    Layout (indentation, line breaks, one item per line or per block) is free; the content is strict: every
    block needs exactly one name and one id (``id`` or ``label_id``), ids are unique integers >= 1, and unknown
    keys or nested blocks raise ``AnnotationError`` naming ``file:line``.
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8-sig") as handle:
            text = handle.read()
    except UnicodeDecodeError as error:
        raise AnnotationError(f"{path}: not UTF-8 text ({error})") from None
    tokens = _pbtxt_tokens(path, text)
    label_map: dict[int, str] = {}
    id_lines: dict[int, int] = {}
    position = 0
    while position < len(tokens):
        fields, opened, position = _pbtxt_block(path, tokens, position)
        missing = [what for what, present in (("name", "name" in fields),
                                              ("id", any(key in fields for key in _ID_KEYS))) if not present]
        if missing:
            raise AnnotationError(f"{path}:{opened}: block without {' and '.join(missing)}; expected "
                                  "'item { name: \"...\" id: N }'")
        id_key = next(key for key in _ID_KEYS if key in fields)
        (kind, value, line), (name_kind, name, name_line) = fields[id_key], fields["name"]
        if kind != "number" or not re.fullmatch(r"[-+]?[0-9]+", value) or int(value) < 1:
            raise AnnotationError(f"{path}:{line}: {id_key} {value} is not an integer >= 1")
        if name_kind != "string" or not name:
            raise AnnotationError(f"{path}:{name_line}: name {name!r} is not a non-empty quoted string")
        action = int(value)
        if action in label_map:
            raise AnnotationError(f"{path}:{line}: duplicate {id_key} {action} (already {label_map[action]!r} "
                                  f"at line {id_lines[action]})")
        label_map[action], id_lines[action] = name, line
    if not label_map:
        raise AnnotationError(f"{path}: no items; expected blocks such as 'item {{ name: \"...\" id: 1 }}'")
    return label_map


def _pbtxt_tokens(path: str, text: str) -> list[tuple[str, str, int]]:
    """(kind, value, line) of every meaningful token; string values are unquoted and unescaped."""
    tokens: list[tuple[str, str, int]] = []
    line, position = 1, 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None:
            snippet = text[position:].split("\n", 1)[0][:40]
            raise AnnotationError(f"{path}:{line}: cannot parse {snippet!r}; expected 'key: value' fields "
                                  "inside 'item { ... }' blocks")
        kind, value = match.lastgroup, match.group()
        if kind == "newline":
            line += 1
        elif kind == "string":
            tokens.append((kind, _unescape(path, line, value[1:-1]), line))
        elif kind in ("number", "word", "punct"):
            tokens.append((kind, value, line))
        position = match.end()
    return tokens


def _unescape(path: str, line: int, body: str) -> str:
    def replace(match: re.Match) -> str:
        if match.group(1) not in _ESCAPES:
            raise AnnotationError(f"{path}:{line}: unsupported escape '\\{match.group(1)}' in a string")
        return _ESCAPES[match.group(1)]

    return re.sub(r"\\(.)", replace, body)


def _pbtxt_block(path: str, tokens, position: int):
    """Parse one ``item { key: value ... }`` block at ``position``: (fields by key, opening line, next position)."""
    kind, value, opened = tokens[position]
    if kind != "word" or value not in _BLOCKS:
        raise AnnotationError(f"{path}:{opened}: unexpected {value!r}; expected 'item {{' to open a block")
    position += 1
    if position < len(tokens) and tokens[position][1] == ":":  # 'item: {' is valid text format too
        position += 1
    if position >= len(tokens) or tokens[position][1] not in ("{", "<"):
        line = tokens[position][2] if position < len(tokens) else opened
        raise AnnotationError(f"{path}:{line}: expected '{{' after {value!r}")
    closing = "}" if tokens[position][1] == "{" else ">"
    position += 1
    fields: dict[str, tuple[str, str, int]] = {}
    while True:
        if position >= len(tokens):
            raise AnnotationError(f"{path}:{opened}: block opened here is never closed with {closing!r}")
        kind, key, line = tokens[position]
        if kind == "punct" and key == closing:
            return fields, opened, position + 1
        if kind != "word":
            raise AnnotationError(f"{path}:{line}: unexpected {key!r}; expected a field such as 'name:' or 'id:'")
        if key not in ("name", *_ID_KEYS, *_IGNORED_KEYS):
            raise AnnotationError(f"{path}:{line}: unknown field {key!r}; expected name, id or label_id")
        if key in fields or (key in _ID_KEYS and any(other in fields for other in _ID_KEYS)):
            raise AnnotationError(f"{path}:{line}: second {key!r} in the block opened at line {opened}")
        if position + 2 >= len(tokens) or tokens[position + 1][1] != ":":
            raise AnnotationError(f"{path}:{line}: expected '{key}: value'")
        value_token = tokens[position + 2]
        if value_token[0] == "punct":
            raise AnnotationError(f"{path}:{value_token[2]}: expected a value after '{key}:', got "
                                  f"{value_token[1]!r} (nested blocks are not part of a label map)")
        fields[key] = value_token
        position += 3


# --------------------------------------------------------------------------- #
# Excluded timestamps
# --------------------------------------------------------------------------- #
def read_excluded_timestamps(path: str | os.PathLike) -> set[str]:
    """The ``"video_id,%04d"`` keys of the keyframes to skip in evaluation (on both the ground-truth and the
    detection side). An empty file is a valid, empty exclusion list."""
    path = os.fspath(path)
    texts, numbers = _data_lines(path)
    keys: set[str] = set()
    for index, text in enumerate(texts):
        columns = text.split(",")
        problem = None
        if len(columns) != 2 or not columns[0].strip():
            problem = f"{len(columns)} comma-separated columns" if len(columns) != 2 else "empty video id"
        else:
            second = _as_int(columns[1])
            if second is None or second < 0:
                problem = f"timestamp {columns[1].strip()!r} is not an integer >= 0"
        if problem:
            raise AnnotationError(f"{path}:{_line_number(numbers, index)}: {problem}; expected "
                                  f"'video_id,timestamp', got {text!r}")
        keys.add(f"{columns[0].strip()},{second:04d}")
    return keys


# --------------------------------------------------------------------------- #
# Dense proposals (.pkl)
# --------------------------------------------------------------------------- #
class _RefusedGlobal(pickle.UnpicklingError):
    def __init__(self, module: str, name: str):
        super().__init__(f"{module}.{name}")
        self.qualified = f"{module}.{name}"


def _latin1_encode(text: str, encoding: str = "latin1", errors: str = "strict") -> bytes:
    """Stands in for ``_codecs.encode``, which protocol-2 pickles call to rebuild ``bytes`` (an array's data)
    as ``encode(text, 'latin1')``; any other codec is refused rather than run."""
    if codecs.lookup(encoding).name != "iso8859-1":
        raise _RefusedGlobal("_codecs", f"encode(..., {encoding!r})")
    return text.encode("latin1", errors)


def _empty_bytes(*args) -> bytes:
    """Stands in for ``bytes``, which protocols 0-2 call without arguments for the data of an empty array;
    with arguments it could allocate at will, so they are refused."""
    if args:
        raise _RefusedGlobal("builtins", "bytes(...) with arguments")
    return b""


@functools.lru_cache(maxsize=None)
def _allowed_globals() -> dict[tuple[str, str], object]:
    """The only callables a proposal pickle may name: what numpy needs to rebuild arrays, dtypes and scalars.

    numpy >= 2 pickles them from ``numpy._core``; files written with numpy 1.x name ``numpy.core``. Both names
    map to the objects of the numpy installed here, so the deprecated ``numpy.core`` is never imported.
    """
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 1.26 has only numpy.core
        from numpy.core import multiarray, numeric
    allowed: dict[tuple[str, str], object] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                                              ("_codecs", "encode"): _latin1_encode,
                                              ("__builtin__", "bytes"): _empty_bytes,
                                              ("builtins", "bytes"): _empty_bytes}
    for package in ("numpy._core", "numpy.core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct  # protocols 0-4
        allowed[(f"{package}.multiarray", "scalar")] = multiarray.scalar  # numpy scalars (np.float32(1))
        if hasattr(numeric, "_frombuffer"):
            allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer  # protocol 5
    return allowed


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild containers of numpy arrays and nothing else.

    Unpickling runs whatever callable the file names; ``find_class`` is where every such name is resolved, so
    refusing all but numpy's array constructors there means a crafted file cannot run code.
    """

    def find_class(self, module: str, name: str):
        target = _allowed_globals().get((module, name))
        if target is None:
            raise _RefusedGlobal(module, name)
        return target


def read_proposals_pkl(path: str | os.PathLike) -> BoxTable:
    """Dense person proposals (mmaction2's ``ava_dense_proposals_*.pkl``) as a ``BoxTable``.

    The file is a pickle of ``{"video_id,%04d": array (N, 4 or 5)}`` holding normalized x1, y1, x2, y2 and an
    optional score; it is loaded without running any code the file names (see ``_ArrayUnpickler``), and rows
    get ``action`` -1 and a NaN score when there is no score column. Coordinates are checked and clipped as
    in the CSVs.
    """
    path = os.fspath(path)
    with open(path, "rb") as handle:
        try:
            # latin1 lets numpy rebuild arrays pickled by Python 2, whose byte strings arrive as str.
            data = _ArrayUnpickler(handle, encoding="latin1").load()
        except _RefusedGlobal as refused:
            raise AnnotationError(f"{path}: refused to load: the pickle calls {refused.qualified}, which is not "
                                  "a numpy array constructor; proposal files hold only a dict of arrays") from None
        except Exception as error:  # a damaged or foreign file can fail in any number of ways inside pickle
            raise AnnotationError(f"{path}: not a readable pickle ({type(error).__name__}: {error})") from None
    if not isinstance(data, dict):
        raise AnnotationError(f"{path}: holds a {type(data).__name__}; expected a dict mapping "
                              "'video_id,%04d' to arrays of boxes")
    videos, seconds, arrays = [], [], []
    for key, value in data.items():
        video, second = _proposal_key(path, key)
        arrays.append(_proposal_array(path, key, value))
        videos.append(video)
        seconds.append(second)
    counts = np.array([len(array) for array in arrays], dtype=np.int64)
    rows = np.concatenate(arrays) if arrays else np.zeros((0, 5), dtype=np.float64)
    total = int(counts.sum())
    return BoxTable(np.repeat(np.array(videos, dtype=object), counts), np.repeat(np.array(seconds), counts),
                    np.clip(rows[:, :4], 0.0, 1.0), np.full(total, NO_ACTION), np.full(total, NO_PERSON),
                    rows[:, 4], source=path)


def _proposal_key(path: str, key) -> tuple[str, int]:
    if isinstance(key, str):
        video, _, second = key.rpartition(",")
        value = _as_int(second)
        if video and value is not None and value >= 0:
            return video, value
    raise AnnotationError(f"{path}: key {key!r} is not a keyframe key; expected 'video_id,%04d' strings")


def _proposal_array(path: str, key: str, value) -> np.ndarray:
    """One keyframe's proposals as float64 (N, 5), a missing score column as NaN, checked like the CSV boxes."""
    where = f"{path}: key {key!r}"
    if not isinstance(value, np.ndarray) or value.ndim != 2 or value.shape[1] not in (4, 5):
        shape = value.shape if isinstance(value, np.ndarray) else type(value).__name__
        raise AnnotationError(f"{where}: {shape}; expected a 2-D array of x1,y1,x2,y2[,score] (N x 4 or N x 5)")
    if not np.issubdtype(value.dtype, np.floating):
        raise AnnotationError(f"{where}: dtype {value.dtype}; expected floating-point boxes")
    array = value.astype(np.float64)
    if not np.isfinite(array).all():
        raise AnnotationError(f"{where}: NaN or infinite values; expected finite boxes and scores")
    coords = array[:, :4]
    if ((coords < -COORD_TOLERANCE) | (coords > 1.0 + COORD_TOLERANCE)).any():
        raise AnnotationError(f"{where}: coordinates outside [0, 1] (min {coords.min():g}, max {coords.max():g}); "
                              "expected normalized x1,y1,x2,y2, not pixels")
    clipped = np.clip(coords, 0.0, 1.0)
    inverted = ~((clipped[:, 0] < clipped[:, 2]) & (clipped[:, 1] < clipped[:, 3]))
    if inverted.any():
        raise AnnotationError(f"{where}: row {int(np.argmax(inverted))} is an empty or inverted box "
                              f"{coords[int(np.argmax(inverted))].tolist()}; expected x1 < x2 and y1 < y2")
    if array.shape[1] == 4:
        array = np.concatenate([array, np.full((len(array), 1), np.nan)], axis=1)
    return array
