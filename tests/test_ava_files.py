"""Tests for datasets/ava/files.py: AVA box CSVs, label maps, excluded timestamps, dense proposal pickles, and
load-time errors naming file:line."""

import codecs
import math
import os
import pickle
import time

import numpy as np
import pytest

from datasets.annotations import AnnotationError
from datasets.ava.files import (
    NO_ACTION,
    NO_PERSON,
    BoxTable,
    filter_detections,
    keep_label_map_actions,
    read_ava_csv,
    read_excluded_timestamps,
    read_label_map,
    read_proposals_pkl,
)


def write(folder, text: str, name: str = "ava.csv", newline: str = "\n") -> str:
    path = folder / name
    path.write_bytes(text.replace("\n", newline).encode("utf-8"))
    return str(path)


def expect_error(path: str, line: int | None, *fragments: str, **read):
    """Run the reader named in ``read`` and check the message names ``path:line`` (or just ``path:``)."""
    reader = read.pop("reader", None) or (lambda p: read_ava_csv(p, **read))
    with pytest.raises(AnnotationError) as caught:
        reader(path)
    message = str(caught.value)
    where = f"{path}:{line}: " if line is not None else f"{path}: "
    assert message.startswith(where), message
    for fragment in fragments:
        assert fragment in message, message
    return message


GT = ("-5KQ66BBWC4,0902,0.077,0.151,0.283,0.811,80,1\n"
      "-5KQ66BBWC4,0902,0.077,0.151,0.283,0.811,12,1\n"
      "_145Aa_xkuE,1798,0.3,0.2,0.9,1.0,17,0\n")


# --------------------------------------------------------------------------- #
# Box CSVs
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_groundtruth_rows_with_crlf_and_trailing_whitespace(tmp_path, newline):
    path = write(tmp_path, GT.replace(",1\n", ",1  \n", 1), newline=newline)
    table = read_ava_csv(path, kind="groundtruth")
    assert len(table) == 3 and table.source == path
    assert table.video_id.tolist() == ["-5KQ66BBWC4", "-5KQ66BBWC4", "_145Aa_xkuE"]
    assert table.timestamp.dtype == np.int64 and table.timestamp.tolist() == [902, 902, 1798]
    assert table.boxes.dtype == np.float32 and table.boxes.shape == (3, 4)
    np.testing.assert_allclose(table.boxes[2], [0.3, 0.2, 0.9, 1.0], rtol=1e-6)
    assert table.action.tolist() == [80, 12, 17]
    assert table.person_id.tolist() == [1, 1, 0]
    assert table.score.dtype == np.float32 and np.isnan(table.score).all()
    assert table.keys().tolist() == ["-5KQ66BBWC4,0902", "-5KQ66BBWC4,0902", "_145Aa_xkuE,1798"]


def test_groundtruth_person_id_is_optional_per_row(tmp_path):
    path = write(tmp_path, "vid,0902,0.1,0.1,0.5,0.5,3\n"
                           "vid,0903,0.1,0.1,0.5,0.5,4,7\n"
                           "vid,0904,0.1,0.1,0.5,0.5,5,\n")
    table = read_ava_csv(path, kind="groundtruth")
    assert table.person_id.tolist() == [NO_PERSON, 7, NO_PERSON]
    assert table.action.tolist() == [3, 4, 5]


def test_detections_with_and_without_action_and_blank_lines(tmp_path):
    path = write(tmp_path, "vid,0902,0.1,0.1,0.5,0.5,,0.99\n"
                           "\n"
                           "vid,0902,0.2,0.1,0.6,0.5,-1,0.5\n"
                           "vid,0903,0.1,0.1,0.5,0.5,12,0.25\n")
    table = read_ava_csv(path, kind="detections")
    assert table.action.tolist() == [NO_ACTION, NO_ACTION, 12]
    np.testing.assert_allclose(table.score, [0.99, 0.5, 0.25], rtol=1e-6)
    assert table.person_id.tolist() == [NO_PERSON] * 3
    # The blank line does not shift later line numbers in messages.
    bad = write(tmp_path, "vid,0902,0.1,0.1,0.5,0.5,,0.99\n\n\nvid,0902,0.1,0.1,0.5,0.5,,high\n", "bad.csv")
    expect_error(bad, 4, "score 'high' is not a finite number", kind="detections")


def test_coordinates_within_tolerance_are_clipped(tmp_path):
    path = write(tmp_path, "vid,0902,-0.0009,0.0,1.0009,1.0004,1\n")
    table = read_ava_csv(path, kind="groundtruth")
    assert table.boxes.tolist() == [[0.0, 0.0, 1.0, 1.0]]


def test_bom_is_not_part_of_the_first_video_id(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeffvid,0902,0.1,0.1,0.5,0.5,1\n".encode("utf-8"))
    assert read_ava_csv(path, kind="groundtruth").video_id.tolist() == ["vid"]


GOOD = "vid,0902,0.1,0.1,0.5,0.5,1,0\n"


@pytest.mark.parametrize("row, fragment", [
    ("vid,0902,0.1,0.1,0.5,0.5", "6 comma-separated columns"),
    ("vid,0902,0.1,0.1,0.5,0.5,1,0,9", "9 comma-separated columns"),
    ("vid,0902.5,0.1,0.1,0.5,0.5,1", "timestamp '0902.5' is not an integer"),
    ("vid,,0.1,0.1,0.5,0.5,1", "timestamp '' is not an integer"),
    ("vid,-3,0.1,0.1,0.5,0.5,1", "negative timestamp -3"),
    ("vid,0902,0.1,abc,0.5,0.5,1", "coordinate 'abc' is not a number"),
    ("vid,0902,0.1,0.1,nan,0.5,1", "x2=nan outside the frame"),
    ("vid,0902,12,0.1,0.5,0.5,1", "x1=12 outside the frame"),
    ("vid,0902,0.1,0.1,0.5,1.002,1", "y2=1.002 outside the frame"),
    ("vid,0902,0.5,0.1,0.5,0.5,1", "empty or inverted box"),
    ("vid,0902,0.1,0.6,0.5,0.5,1", "empty or inverted box"),
    ("vid,0902,1.0003,0.1,1.0008,0.5,1", "empty or inverted box"),  # only empty once clipped
    ("vid,0902,0.1,0.1,0.5,0.5,", "action id '' is not an integer"),
    ("vid,0902,0.1,0.1,0.5,0.5,run", "action id 'run' is not an integer"),
    ("vid,0902,0.1,0.1,0.5,0.5,0", "action id 0"),
    ("vid,0902,0.1,0.1,0.5,0.5,1,p7", "person id 'p7' is not an integer"),
    (",0902,0.1,0.1,0.5,0.5,1", "empty video id"),
    ("vid,99999999999999999999,0.1,0.1,0.5,0.5,1", "is not an integer"),
])
def test_groundtruth_errors_name_file_and_line(tmp_path, row, fragment):
    path = write(tmp_path, GOOD * 3 + row + "\n" + GOOD)
    message = expect_error(path, 4, fragment, kind="groundtruth")
    assert repr(row) in message  # the offending text, as read


@pytest.mark.parametrize("row, fragment", [
    ("vid,0902,0.1,0.1,0.5,0.5,0.9", "7 comma-separated columns"),
    ("vid,0902,0.1,0.1,0.5,0.5,,", "score '' is not a finite number"),
    ("vid,0902,0.1,0.1,0.5,0.5,,inf", "score 'inf' is not a finite number"),
    ("vid,0902,0.1,0.1,0.5,0.5,,nan", "score 'nan' is not a finite number"),
    ("vid,0902,0.1,0.1,0.5,0.5,0,0.9", "action id 0"),
    ("vid,0902,0.1,0.1,0.5,0.5,-2,0.9", "action id -2"),
    ("vid,0902,0.1,0.1,500,0.5,,0.9", "x2=500 outside the frame"),
])
def test_detection_errors_name_file_and_line(tmp_path, row, fragment):
    good = "vid,0902,0.1,0.1,0.5,0.5,,0.9\n"
    path = write(tmp_path, good * 2 + row + "\n")
    expect_error(path, 3, fragment, kind="detections")


def test_the_first_bad_line_is_reported_whatever_the_kind_of_error(tmp_path):
    # A range error on line 2 comes before a non-numeric value on line 3, although the bulk conversion
    # notices the latter first.
    path = write(tmp_path, GOOD + "vid,0902,0.1,0.1,5,0.5,1\n" + "vid,x,0.1,0.1,0.5,0.5,1\n")
    expect_error(path, 2, "x2=5 outside", kind="groundtruth")


def test_errors_deep_in_a_large_file_name_their_line(tmp_path):
    rows = [GOOD] * 300_000  # more than one bulk chunk
    rows[200_123] = "vid,0902,0.1,0.1,0.5,0.5,1,0,extra\n"
    path = write(tmp_path, "".join(rows))
    expect_error(path, 200_124, "9 comma-separated columns", kind="groundtruth")
    rows[200_123], rows[250_000] = GOOD, "vid,0902,0.7,0.1,0.5,0.5,1\n"
    path = write(tmp_path, "".join(rows))
    expect_error(path, 250_001, "empty or inverted box", kind="groundtruth")


def test_empty_file_and_unknown_kind(tmp_path):
    expect_error(write(tmp_path, "\n  \n"), None, "no rows", kind="groundtruth")
    with pytest.raises(ValueError, match="unknown AVA CSV kind"):
        read_ava_csv(write(tmp_path, GOOD), kind="predictions")


# --------------------------------------------------------------------------- #
# The table and the filters
# --------------------------------------------------------------------------- #
def test_select_and_keys(tmp_path):
    table = read_ava_csv(write(tmp_path, GT), kind="groundtruth")
    picked = table.select(table.action > 15)
    assert len(picked) == 2 and picked.source == table.source
    assert picked.keys().tolist() == ["-5KQ66BBWC4,0902", "_145Aa_xkuE,1798"]
    assert table.select(np.array([2, 0])).action.tolist() == [17, 80]
    with pytest.raises(ValueError, match="boolean mask"):
        table.select(np.array([True, False]))
    with pytest.raises(ValueError, match="differ in length"):
        BoxTable(["a"], [1, 2], np.zeros((1, 4)), [1], [0], [0.5])


def test_filter_detections_keeps_scores_at_or_above_the_threshold(tmp_path):
    path = write(tmp_path, "v,0902,0.1,0.1,0.5,0.5,,0.8\n"
                           "v,0902,0.2,0.1,0.5,0.5,,0.79\n"
                           "v,0903,0.1,0.1,0.5,0.5,,0.95\n")
    kept = filter_detections(read_ava_csv(path, kind="detections"), 0.8)
    np.testing.assert_allclose(kept.score, [0.8, 0.95], rtol=1e-6)
    with pytest.raises(ValueError, match="without a score"):
        filter_detections(read_ava_csv(write(tmp_path, GT, "gt.csv"), kind="groundtruth"), 0.8)


def test_keep_label_map_actions_drops_and_counts(tmp_path):
    path = write(tmp_path, "v,0902,0.1,0.1,0.5,0.5,1,0.9\n"
                           "v,0902,0.1,0.1,0.5,0.5,2,0.9\n"
                           "v,0902,0.1,0.1,0.5,0.5,2,0.9\n"
                           "v,0903,0.1,0.1,0.5,0.5,80,0.9\n"
                           "v,0903,0.1,0.1,0.5,0.5,,0.9\n")
    table = read_ava_csv(path, kind="detections")
    kept, ignored = keep_label_map_actions(table, {1: "bend/bow (at the waist)", 80: "watch (a person)"})
    assert kept.action.tolist() == [1, 80]
    assert ignored == {-1: 1, 2: 2}
    kept, ignored = keep_label_map_actions(table, {1: "a", 80: "b"}, keep_unlabeled=True)
    assert kept.action.tolist() == [1, 80, NO_ACTION] and ignored == {2: 2}


# --------------------------------------------------------------------------- #
# Label map
# --------------------------------------------------------------------------- #
def test_label_map_items_labels_and_free_layout(tmp_path):
    path = write(tmp_path, '# AVA v2.2, the 60 evaluated actions\n'
                           'item {\n'
                           '  name: "bend/bow (at the waist)"\n'
                           '  id: 1\n'
                           '}\n'
                           'item { name: "crouch/kneel" id: 3 }\n'
                           'label{\n'
                           '\tname:   "talk to (e.g., self, a person, a group)"  # a comment\n'
                           'label_id:79\n'
                           '    label_type: PERSON_INTERACTION\n'
                           '}\n'
                           "item: { name: 'say \\\"hi\\\"' id: 2 }\n"
                           'item < name: "angle brackets" id: 5 >\n', "actions.pbtxt")
    label_map = read_label_map(path)
    assert list(label_map.items()) == [(1, "bend/bow (at the waist)"), (3, "crouch/kneel"),
                                       (79, "talk to (e.g., self, a person, a group)"), (2, 'say "hi"'),
                                       (5, "angle brackets")]


@pytest.mark.parametrize("text, line, fragment", [
    ('item {\n  name: "a"\n  id: 1\n}\nitem {\n  name: "b"\n  id: 1\n}\n', 7, "duplicate id 1 (already 'a' at line 3)"),
    ('item {\n  name: "a"\n  id: 1\n}\nitem {\n  name: "b"\n}\n', 5, "block without id"),
    ('item {\n  id: 4\n}\n', 1, "block without name"),
    ('item {\n}\n', 1, "block without name and id"),
    ('item {\n  name: "a"\n  id: 1.5\n}\n', 3, "id 1.5 is not an integer >= 1"),
    ('item {\n  name: "a"\n  id: 0\n}\n', 3, "id 0 is not an integer >= 1"),
    ('item {\n  name: "a"\n  id: one\n}\n', 3, "id one is not an integer >= 1"),
    ('item {\n  name: a\n  id: 1\n}\n', 2, "not a non-empty quoted string"),
    ('item {\n  name: ""\n  id: 1\n}\n', 2, "not a non-empty quoted string"),
    ('item {\n  name: "a"\n  id: 1\n  label_id: 2\n}\n', 4, "second 'label_id'"),
    ('item {\n  name: "a"\n  name: "b"\n  id: 1\n}\n', 3, "second 'name'"),
    ('item {\n  name: "a"\n  colour: "red"\n  id: 1\n}\n', 3, "unknown field 'colour'"),
    ('item {\n  name: "a"\n  id: 1\n', 1, "never closed"),
    ('item {\n  name: "a"\n  id: 1\n}\n}\n', 5, "unexpected '}'"),
    ('items {\n  name: "a"\n  id: 1\n}\n', 1, "unexpected 'items'"),
    ('item {\n  name: "a"\n  id: 1\n}\nitem\n', 5, "expected '{' after 'item'"),
    ('item {\n  name "a"\n  id: 1\n}\n', 2, "expected 'name: value'"),
    ('item {\n  name: "a\n  id: 1\n}\n', 2, "cannot parse"),
    ('item {\n  name: "a"\n  id: 1\n  inner { id: 2 }\n}\n', 4, "unknown field 'inner'"),
    ('item {\n  name: {\n  id: 1\n}\n', 2, "expected a value after 'name:'"),
    ('item {\n  name: "a\\q"\n  id: 1\n}\n', 2, "unsupported escape"),
])
def test_label_map_errors_name_file_and_line(tmp_path, text, line, fragment):
    expect_error(write(tmp_path, text, "map.pbtxt"), line, fragment, reader=read_label_map)


def test_empty_label_map(tmp_path):
    expect_error(write(tmp_path, "# nothing\n", "map.pbtxt"), None, "no items", reader=read_label_map)


# --------------------------------------------------------------------------- #
# Excluded timestamps
# --------------------------------------------------------------------------- #
def test_excluded_timestamps(tmp_path):
    path = write(tmp_path, "-5KQ66BBWC4,0902\n_145Aa_xkuE,1798  \n\n1j20qq1JyX4,905\n", "excluded.csv", "\r\n")
    assert read_excluded_timestamps(path) == {"-5KQ66BBWC4,0902", "_145Aa_xkuE,1798", "1j20qq1JyX4,0905"}
    assert read_excluded_timestamps(write(tmp_path, "", "empty.csv")) == set()


@pytest.mark.parametrize("row, fragment", [
    ("vid", "1 comma-separated columns"),
    ("vid,0902,1", "3 comma-separated columns"),
    ("vid,09.5", "timestamp '09.5' is not an integer >= 0"),
    ("vid,-1", "timestamp '-1' is not an integer >= 0"),
    (",0902", "empty video id"),
])
def test_excluded_timestamp_errors(tmp_path, row, fragment):
    path = write(tmp_path, f"a,0902\n\n{row}\n", "excluded.csv")
    expect_error(path, 3, fragment, reader=read_excluded_timestamps)


# --------------------------------------------------------------------------- #
# Dense proposals
# --------------------------------------------------------------------------- #
def pickle_file(folder, obj, protocol: int = 4, name: str = "proposals.pkl") -> str:
    path = folder / name
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return str(path)


@pytest.mark.parametrize("protocol", [0, 2, 3, 4, 5])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_proposals_pickle_of_a_dict_of_arrays(tmp_path, protocol, dtype):
    proposals = {
        "-5KQ66BBWC4,0902": np.array([[0.1, 0.2, 0.5, 0.9, 0.99], [0.0, 0.0, 1.0004, 1.0, 0.5]], dtype=dtype),
        "_145Aa_xkuE,1798": np.zeros((0, 5), dtype=dtype),
        "1j20qq1JyX4,0905": np.array([[0.3, 0.3, 0.4, 0.4, 0.75]], dtype=dtype),
    }
    table = read_proposals_pkl(pickle_file(tmp_path, proposals, protocol))
    assert table.keys().tolist() == ["-5KQ66BBWC4,0902", "-5KQ66BBWC4,0902", "1j20qq1JyX4,0905"]
    np.testing.assert_allclose(table.boxes, [[0.1, 0.2, 0.5, 0.9], [0, 0, 1, 1], [0.3, 0.3, 0.4, 0.4]], rtol=1e-6)
    np.testing.assert_allclose(table.score, [0.99, 0.5, 0.75], rtol=1e-6)
    assert table.action.tolist() == [NO_ACTION] * 3 and table.person_id.tolist() == [NO_PERSON] * 3


def test_proposals_without_scores_and_with_numpy_scalars(tmp_path):
    # A numpy scalar elsewhere in the pickle needs numpy's 'scalar' global; the value is then refused as a box.
    path = pickle_file(tmp_path, {"v,0902": np.array([[0.1, 0.1, 0.2, 0.2]]), "v,0903": np.float32(1.0)}, 2)
    expect_error(path, None, "key 'v,0903'", "expected a 2-D array", reader=read_proposals_pkl)
    table = read_proposals_pkl(pickle_file(tmp_path, {"v,0902": np.array([[0.1, 0.1, 0.2, 0.2]])}, 2))
    assert table.boxes.shape == (1, 4) and math.isnan(table.score[0])


class _Calls:
    """Pickles as a call of ``function(*args)``, whatever the function."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_proposals_pickle_that_runs_a_command_is_refused_and_never_runs(tmp_path, protocol):
    marker = tmp_path / "pwned"
    payload = {"v,0902": np.zeros((1, 5)), "v,0903": _Calls(os.system, f"touch {marker}")}
    path = pickle_file(tmp_path, payload, protocol)
    # Loading it the ordinary way would run the command; that is what the restricted loader prevents.
    message = expect_error(path, None, "refused to load", f"{os.system.__module__}.system",
                           reader=read_proposals_pkl)
    assert "not a numpy array constructor" in message
    assert not marker.exists()


def test_proposals_written_with_numpy_1_load(tmp_path):
    # numpy 1.x names its array constructors under numpy.core, numpy 2 under numpy._core.
    data = pickle.dumps({"v,0902": np.array([[0.1, 0.1, 0.5, 0.5, 0.9]])}, protocol=2)
    assert b"cnumpy._core.multiarray\n" in data
    path = tmp_path / "numpy1.pkl"
    path.write_bytes(data.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"))
    np.testing.assert_allclose(read_proposals_pkl(path).score, [0.9])


@pytest.mark.parametrize("call, refused", [
    (_Calls(codecs.encode, "payload", "zlib_codec"), "_codecs.encode(..., 'zlib_codec')"),
    (_Calls(bytes, 10 ** 6), "builtins.bytes(...) with arguments"),
    (_Calls(eval, "1 + 1"), "__builtin__.eval"),  # protocol 2 spells builtins the Python 2 way
])
def test_proposals_allowed_globals_only_as_numpy_uses_them(tmp_path, call, refused):
    path = pickle_file(tmp_path, {"v,0902": call}, 2)
    expect_error(path, None, f"the pickle calls {refused}", reader=read_proposals_pkl)


@pytest.mark.parametrize("obj, fragment", [
    ([np.zeros((1, 5))], "holds a list"),
    ({"v,0902": np.zeros((3,))}, "expected a 2-D array"),
    ({"v,0902": np.zeros((1, 6))}, "expected a 2-D array"),
    ({"v,0902": np.zeros((1, 5), dtype=np.int64)}, "dtype int64"),
    ({"v,0902": np.array([[0.1, 0.1, 0.5, 0.5, np.nan]])}, "NaN or infinite"),
    ({"v,0902": np.array([[10.0, 10.0, 200.0, 300.0, 0.9]])}, "not pixels"),
    ({"v,0902": np.array([[0.1, 0.1, 0.5, 0.5, 0.9], [0.6, 0.1, 0.5, 0.5, 0.9]])}, "row 1 is an empty or inverted"),
    ({"v0902": np.zeros((0, 5))}, "not a keyframe key"),
    ({("v", 902): np.zeros((0, 5))}, "not a keyframe key"),
])
def test_proposals_content_errors(tmp_path, obj, fragment):
    expect_error(pickle_file(tmp_path, obj), None, fragment, reader=read_proposals_pkl)


def test_proposals_refuse_other_globals_and_damaged_files(tmp_path):
    import collections

    expect_error(pickle_file(tmp_path, {"v,0902": collections.Counter()}), None, "collections.Counter",
                 reader=read_proposals_pkl)
    damaged = tmp_path / "damaged.pkl"
    damaged.write_bytes(pickle.dumps({"v,0902": np.zeros((2, 5))}, protocol=4)[:-20])
    expect_error(str(damaged), None, "not a readable pickle", reader=read_proposals_pkl)


# --------------------------------------------------------------------------- #
# Speed (informational: printed, not asserted)
# --------------------------------------------------------------------------- #
@pytest.mark.skipif(os.environ.get("AVA_TIMING") != "1", reason="timing only; set AVA_TIMING=1 (about 10 s)")
def test_a_million_rows_parse_in_bulk(tmp_path, capsys):
    rng = np.random.default_rng(0)
    count = 1_000_000
    x1, y1 = rng.uniform(0, 0.5, (2, count)).round(3)
    row = "{},{:04d},{:.3f},{:.3f},{:.3f},{:.3f},{},{}\n"
    videos = ["-5KQ66BBWC4", "_145Aa_xkuE", "1j20qq1JyX4"]
    text = "".join(row.format(videos[i % 3], 902 + i % 897, a, b, a + 0.3, b + 0.3, 1 + i % 80, i % 7)
                   for i, (a, b) in enumerate(zip(x1.tolist(), y1.tolist())))
    path = write(tmp_path, text)
    start = time.perf_counter()
    table = read_ava_csv(path, kind="groundtruth")
    elapsed = time.perf_counter() - start
    assert len(table) == count and table.action.max() == 80
    with capsys.disabled():
        print(f"\nread_ava_csv: {count} ground-truth rows in {elapsed:.2f} s")


def test_a_dense_proposal_pickle_gives_the_keyframes_of_the_same_detections_csv(tmp_path):
    """data.val_detections may be mmaction2's proposal pickle: the same boxes and scores as a detections CSV give
    the same keyframes to score (rows under detection_min_score dropped alike)."""
    from datasets.ava.splits import AVADataConfig, detected_keyframes

    boxes = {"vid_a,0902": [[0.1, 0.2, 0.5, 0.875, 0.9375], [0.25, 0.25, 0.75, 0.75, 0.5]],
             "vid_b,0903": [[0.0, 0.0, 1.0, 1.0, 0.875]]}
    (tmp_path / "excluded.csv").write_text("")
    (tmp_path / "detections.csv").write_text("".join(
        f"{key},{','.join(str(v) for v in row[:4])},,{row[4]}\n" for key, rows in boxes.items() for row in rows))
    pickle_file(tmp_path, {key: np.array(rows, np.float32) for key, rows in boxes.items()}, name="proposals.pkl")
    kept = {}
    for name in ("detections.csv", "proposals.pkl"):
        data = AVADataConfig(root=str(tmp_path), val_detections=name, val_excluded="excluded.csv",
                             detection_min_score=0.8)
        kept[name] = [(k.key, k.boxes.tolist()) for k in detected_keyframes(data)]
    assert kept["proposals.pkl"] == kept["detections.csv"]
    assert [key for key, _ in kept["detections.csv"]] == ["vid_a,0902", "vid_b,0903"]
    assert len(kept["detections.csv"][0][1]) == 1  # the 0.5-scored box is under the threshold
