"""Tests for datasets/annotations.py: every list format, the folder scan, and load-time errors naming file:line."""

import os

import pytest

from datasets.annotations import (
    AnnotationError,
    VideoRecord,
    parse_line,
    read_annotations,
    scan_video_folder,
)
from datasets.files import partial_path


def write_list(folder, text: str, name: str = "train.csv") -> str:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return str(path)


# --------------------------------------------------------------------------- #
# The formats
# --------------------------------------------------------------------------- #
def test_video_list_with_spaces_root_comments_and_blank_lines(tmp_path):
    path = write_list(tmp_path, "# Kinetics-400, train split\n"
                                "\n"
                                "abseiling/clip one.mp4 0\n"
                                "   \n"
                                "air drumming/x y  z.mp4 399\n"
                                "/abs/path/c.mp4\t7\n"
                                "unlabeled.mp4 -1\n")
    records = read_annotations(path, data_root=tmp_path / "videos")
    root = str(tmp_path / "videos")
    assert records == [
        VideoRecord(os.path.join(root, "abseiling/clip one.mp4"), 0, source=f"{path}:3"),
        VideoRecord(os.path.join(root, "air drumming/x y  z.mp4"), 399, source=f"{path}:5"),
        VideoRecord("/abs/path/c.mp4", 7, source=f"{path}:6"),  # an absolute path ignores the root
        VideoRecord(os.path.join(root, "unlabeled.mp4"), -1, source=f"{path}:7"),
    ]


def test_relative_paths_without_a_root_are_relative_to_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    [record] = read_annotations(write_list(tmp_path, "a/b.mp4 1\n"))
    assert record.path == str(tmp_path / "a" / "b.mp4")


def test_byte_order_mark_and_windows_line_endings(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes("\ufeffa.mp4 1\r\nb c.mp4 2\r\n".encode("utf-8"))
    records = read_annotations(str(path), data_root="/data")
    assert [(r.path, r.label) for r in records] == [("/data/a.mp4", 1), ("/data/b c.mp4", 2)]


def test_videomae_v2_video_lines(tmp_path):
    path = write_list(tmp_path, "k710/a b.mp4 0 -1\nk710/c.mp4 0 -1\n", name="train_v2.txt")
    records = read_annotations(path, format="video_v2", data_root="/data")
    assert records == [
        VideoRecord("/data/k710/a b.mp4", -1, start=0, num_frames=None, source=f"{path}:1"),
        VideoRecord("/data/k710/c.mp4", -1, start=0, num_frames=None, source=f"{path}:2"),
    ]


def test_raw_frame_lines_start_and_total(tmp_path):
    path = write_list(tmp_path, "frames/clip 1 300\nframes/other clip 0 48\n")
    records = read_annotations(path, format="frames_start_total", data_root="/data")
    assert [(r.path, r.label, r.start, r.num_frames) for r in records] == [
        ("/data/frames/clip", -1, 1, 300),
        ("/data/frames/other clip", -1, 0, 48),
    ]


def test_ssv2_raw_frame_lines_total_and_label(tmp_path):
    path = write_list(tmp_path, "74225 62 140\n116154 51 127\n")
    records = read_annotations(path, format="frames_total_label", data_root="/ssv2/frames", num_classes=174)
    assert [(r.path, r.label, r.start, r.num_frames) for r in records] == [
        ("/ssv2/frames/74225", 140, 0, 62),
        ("/ssv2/frames/116154", 127, 0, 51),
    ]


# --------------------------------------------------------------------------- #
# Load-time errors: file, 1-based line number, the line, the expectation
# --------------------------------------------------------------------------- #
MALFORMED = [
    # (format, bad line, text the message must contain)
    ("video", "foo.mp4 abc", "expected '<path> <label>' with an integer label, got 'foo.mp4 abc'"),
    ("video", "foo.mp4", "expected '<path> <label>' with an integer label, got 'foo.mp4'"),
    ("video", "foo.mp4 1.5", "expected '<path> <label>' with an integer label"),
    ("video", "foo.mp4 -3", "negative label -3; expected a label >= 0, or -1 for unlabeled, got 'foo.mp4 -3'"),
    ("video_v2", "a.mp4 -1", "expected '<path> <start> -1' with integer columns, got 'a.mp4 -1'"),
    ("video_v2", "a.mp4 0 300", "frame count 300 on a video line; expected '-1' (frame count unknown)"),
    ("video_v2", "a.mp4 -2 -1", "negative start index -2; expected a start index >= 0"),
    ("frames_start_total", "clip 1 -1", "frame count -1; expected a frame count >= 1; '-1' marks a video line"),
    ("frames_start_total", "clip 1", "expected '<frame_dir> <start_idx> <total_frames>' with integer columns"),
    ("frames_total_label", "clip 0 5", "frame count 0; expected a frame count >= 1"),
    ("frames_total_label", "clip 12 x", "expected '<frame_dir> <total_frames> <label>' with integer columns"),
]


@pytest.mark.parametrize("format, bad_line, message", MALFORMED)
def test_malformed_line_names_file_line_text_and_expectation(tmp_path, format, bad_line, message):
    good = {"video": "ok.mp4 1", "video_v2": "ok.mp4 0 -1", "frames_start_total": "ok 1 10",
            "frames_total_label": "ok 10 1"}[format]
    path = write_list(tmp_path, f"# header\n{good}\n\n{bad_line}\n{good}\n")
    with pytest.raises(AnnotationError) as caught:
        read_annotations(path, format=format)
    assert str(caught.value).startswith(f"{path}:4: ")  # comments and blank lines count
    assert message in str(caught.value)


def test_annotation_error_is_a_value_error():
    assert issubclass(AnnotationError, ValueError)


@pytest.mark.parametrize("line, message", [
    ("a.mp4 400", "label 400 out of range; expected a label in [0, 400) (num_classes=400), got 'a.mp4 400'"),
    ("a.mp4 -1", "unlabeled entry (-1); expected a label in [0, 400)"),
])
def test_num_classes_range_check(tmp_path, line, message):
    path = write_list(tmp_path, f"a.mp4 399\n{line}\n")
    with pytest.raises(AnnotationError, match=r"train\.csv:2: ") as caught:
        read_annotations(path, num_classes=400)
    assert message in str(caught.value)
    assert len(read_annotations(path, num_classes=None)) == 2  # without the check both lines are valid


def test_num_classes_for_an_unlabeled_format_is_refused(tmp_path):
    path = write_list(tmp_path, "a.mp4 0 -1\n")
    with pytest.raises(ValueError, match="carries no labels"):
        read_annotations(path, format="video_v2", num_classes=10)


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n\n# another\n"])
def test_a_list_without_entries_is_an_error_naming_the_file(tmp_path, text):
    path = write_list(tmp_path, text)
    with pytest.raises(AnnotationError, match=f"{path}: no entries"):
        read_annotations(path)


def test_missing_list_unknown_format_and_non_utf8(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.csv"):
        read_annotations(tmp_path / "nowhere.csv")
    with pytest.raises(AnnotationError, match="nowhere.csv"):  # an entry point's one-line error, exit 2
        read_annotations(tmp_path / "nowhere.csv")
    path = write_list(tmp_path, "a.mp4 1\n")
    with pytest.raises(ValueError, match="unknown annotation format 'csv'"):
        read_annotations(path, format="csv")
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"a\xff\xfe.mp4 1\n")
    with pytest.raises(AnnotationError, match="binary.csv: not UTF-8"):
        read_annotations(binary)


def test_parse_line_alone():
    record = parse_line("my clip.mp4 3", format="video", data_root="/d", source="list:9")
    assert record == VideoRecord("/d/my clip.mp4", 3, source="list:9")


# --------------------------------------------------------------------------- #
# Folder scan
# --------------------------------------------------------------------------- #
def touch(path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def test_folder_scan_finds_nested_videos_sorted(tmp_path):
    root = tmp_path / "videos"
    for name in ["b/z.mp4", "b/a clip.webm", "a.mkv", "a/deep/er/x.AVI", "c.mov", "b/notes.txt", "readme.md",
                 ".hidden/v.mp4", "b/._v.mp4", "b/w.mp4.partial.mp4"]:
        touch(root / name)
    touch(partial_path(root / "b/y.mp4", keep_suffix=True))  # what datasets.video_io writes before renaming
    records = read_annotations(root)
    relative = [os.path.relpath(r.path, root) for r in records]
    assert relative == ["a/deep/er/x.AVI", "a.mkv", "b/a clip.webm", "b/z.mp4", "c.mov"]
    assert all(r.label == -1 and os.path.isabs(r.path) and r.source == r.path for r in records)
    assert records == scan_video_folder(str(root))


def test_folder_scan_follows_symlinked_folders_once(tmp_path):
    touch(tmp_path / "store" / "v.mp4")
    root = tmp_path / "videos"
    root.mkdir()
    os.symlink(tmp_path / "store", root / "linked")
    os.symlink(root, root / "linked" / "loop")  # a cycle must not make the scan run forever
    assert [os.path.relpath(r.path, root) for r in read_annotations(root)] == ["linked/v.mp4"]


def test_folder_scan_errors(tmp_path):
    touch(tmp_path / "videos" / "notes.txt")
    with pytest.raises(AnnotationError, match="no videos found"):
        read_annotations(tmp_path / "videos")
    touch(tmp_path / "videos" / "v.mp4")
    with pytest.raises(ValueError, match="num_classes does not apply"):
        read_annotations(tmp_path / "videos", num_classes=3)
    with pytest.raises(ValueError, match="format='frames_total_label' applies to list files"):
        read_annotations(tmp_path / "videos", format="frames_total_label")
    with pytest.raises(ValueError, match="data_root applies to list files"):
        read_annotations(tmp_path / "videos", data_root="/data")
