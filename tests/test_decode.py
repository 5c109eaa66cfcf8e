"""Tests for datasets/decode.py on real H.264 files: decord and PyAV agree, frame folders, and every failure."""

import os
import pickle

import av
import numpy as np
import pytest
from PIL import Image

from datasets.annotations import VideoRecord
from datasets.decode import (
    VideoReadError,
    _span,
    decode_all,
    decode_jpeg_pil,
    decode_jpeg_torchvision,
    open_video,
)
from datasets.video_io import write_video

from video_corpus import HEIGHT, WIDTH, cut, frames, remux, timestamps_in_decoding_order, trimmed_by_edit_list

NUM_FRAMES, FPS = 40, 25
VIDEO_BACKENDS = ["decord", "pyav"]

# torchvision 0.29 warns on every image decode; datasets.decode silences it, but pytest resets filters per test.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")


def faststart_copy(source: str, target: str) -> list[int]:
    """Remux with the index (moov) before the data, as streaming sites serve mp4; returns the packet sizes.

    With the index at the end (the writer's layout) any cut loses it and the file cannot be opened at all;
    with it in front, a cut leaves an openable file whose last frames are missing.
    """
    sizes = []
    with av.open(source) as reader, av.open(target, "w", options={"movflags": "faststart"}) as writer:
        stream_in = reader.streams.video[0]
        stream_out = writer.add_stream_from_template(stream_in)
        for packet in reader.demux(stream_in):
            if packet.size:
                sizes.append(packet.size)
                packet.stream = stream_out
                writer.mux(packet)
    return sizes


def trimmed_copy(source: str, target: str, hidden: int = 2) -> int:
    """``video_corpus.trimmed_by_edit_list`` of ``source`` into ``target``; returns the source index of the first
    frame shown."""
    with av.open(source) as reader:
        packets = [packet for packet in reader.demux(video=0) if packet.size]
    keyframe_pts = [packet.pts for packet in packets if packet.is_keyframe][1]
    remux(source, target, edit=lambda kept: trimmed_by_edit_list(kept, hidden))
    return sorted(packet.pts for packet in packets).index(keyframe_pts) + hidden


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """{'gop4': path, 'gop_default': path}: keyframes every 4 frames, and x264's default (only the first here)."""
    folder = tmp_path_factory.mktemp("videos")
    paths = {}
    for name, gop in [("gop4", 4), ("gop_default", None)]:
        paths[name] = str(folder / f"{name}.mp4")
        assert write_video(paths[name], frames(NUM_FRAMES), FPS, gop=gop) == NUM_FRAMES
    return paths


@pytest.fixture(scope="module")
def reference(videos):
    """Every frame of each video, decoded sequentially by PyAV on its own (no seeking, no index)."""
    decoded = {}
    for name, path in videos.items():
        with av.open(path) as container:
            decoded[name] = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    return decoded


# --------------------------------------------------------------------------- #
# decord and PyAV agree
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("name", ["gop4", "gop_default"])
def test_backends_report_the_same_count_and_rate(videos, name):
    for backend in VIDEO_BACKENDS:
        with open_video(videos[name], backend) as source:
            assert (source.num_frames, source.fps) == (NUM_FRAMES, FPS), backend


@pytest.mark.parametrize("name", ["gop4", "gop_default"])
def test_every_frame_is_the_one_that_was_written(videos, reference, name):
    """Lossy, but each decoded frame is nearest to its own source frame: indices are not shifted."""
    source_frames = np.stack(frames(NUM_FRAMES)).astype(np.int32)
    distances = np.abs(reference[name][:, None].astype(np.int32) - source_frames[None]).mean(axis=(2, 3, 4))
    np.testing.assert_array_equal(distances.argmin(axis=1), np.arange(NUM_FRAMES))


@pytest.mark.parametrize("name", ["gop4", "gop_default"])
@pytest.mark.parametrize("backend", VIDEO_BACKENDS)
def test_all_frames_equal_sequential_decoding_exactly(videos, reference, name, backend):
    # Measured: decord and PyAV return bit-identical RGB (both convert with FFmpeg's swscale defaults).
    with open_video(videos[name], backend) as source:
        np.testing.assert_array_equal(decode_all(source), reference[name])


INDEX_REQUESTS = [
    [NUM_FRAMES - 1],                      # the last frame alone
    [30, 2, 2, 17, 0, NUM_FRAMES - 1, 17],  # unsorted, repeated
    [20, 3, 11],                           # unsorted, distinct
    list(range(8, 40, 4)),                 # a strided clip in the middle
    [5, 6, 7],
]


@pytest.mark.parametrize("name", ["gop4", "gop_default"])
@pytest.mark.parametrize("backend", VIDEO_BACKENDS)
def test_frames_come_back_in_the_requested_order(videos, reference, name, backend):
    # One source for all requests: later reads seek backwards past frames decoded before.
    with open_video(videos[name], backend) as source:
        for indices in INDEX_REQUESTS:
            got = source.get_frames(indices)
            assert got.dtype == np.uint8 and got.shape == (len(indices), HEIGHT, WIDTH, 3)
            np.testing.assert_array_equal(got, reference[name][indices])


def test_decord_and_pyav_return_identical_frames(videos):
    indices = [39, 0, 13, 13, 38, 21]
    for path in videos.values():
        with open_video(path, "decord") as by_decord, open_video(path, "pyav") as by_pyav:
            np.testing.assert_array_equal(by_decord.get_frames(indices), by_pyav.get_frames(indices))


def test_pyav_without_usable_timestamps_decodes_from_the_start(videos, reference):
    with open_video(videos["gop4"], "pyav") as source:
        source._index.untrusted = "as for packets without unique timestamps"  # frames are counted instead
        assert source.counted
        for indices in INDEX_REQUESTS:
            np.testing.assert_array_equal(source.get_frames(indices), reference["gop4"][indices])


def test_records_open_like_paths(videos, reference):
    record = VideoRecord(videos["gop4"], label=3, source="list.txt:1")
    with open_video(record, "pyav") as source:
        np.testing.assert_array_equal(source.get_frames([1]), reference["gop4"][[1]])


# --------------------------------------------------------------------------- #
# Failures: always VideoReadError naming the path, never frames
# --------------------------------------------------------------------------- #
def read_everything(path: str, backend: str) -> np.ndarray:
    with open_video(path, backend) as source:
        return source.get_frames(range(source.num_frames))


def assert_read_error(path: str, backend: str) -> VideoReadError:
    with pytest.raises(VideoReadError) as caught:
        read_everything(path, backend)
    assert caught.value.path == path and path in str(caught.value)
    return caught.value


@pytest.fixture(scope="module")
def broken(videos, tmp_path_factory):
    """Damaged copies of the gop4 video."""
    folder = tmp_path_factory.mktemp("broken")
    original = videos["gop4"]
    paths = {"missing": str(folder / "missing.mp4")}
    paths["empty"] = cut(original, str(folder / "empty.mp4"), 0)
    paths["random"] = str(folder / "random.mp4")
    with open(paths["random"], "wb") as handle:
        handle.write(np.random.default_rng(0).bytes(4096))
    paths["half"] = cut(original, str(folder / "half.mp4"), os.path.getsize(original) // 2)
    faststart = str(folder / "faststart.mp4")
    sizes = faststart_copy(original, faststart)
    total = os.path.getsize(faststart)
    paths["faststart_half"] = cut(faststart, str(folder / "faststart_half.mp4"), total // 2)
    paths["faststart_tail"] = cut(faststart, str(folder / "faststart_tail.mp4"), total - sizes[-1] // 2)
    paths["faststart_boundary"] = cut(faststart, str(folder / "faststart_boundary.mp4"), total - sizes[-1])
    paths["faststart"] = faststart
    return paths


def test_faststart_copy_is_a_valid_video_with_the_index_first(broken, reference):
    with open(broken["faststart"], "rb") as handle:
        data = handle.read()
    assert data.find(b"moov") < data.find(b"mdat")
    for backend in VIDEO_BACKENDS:
        np.testing.assert_array_equal(read_everything(broken["faststart"], backend), reference["gop4"])


@pytest.mark.parametrize("damage", ["missing", "empty", "random", "half", "faststart_half", "faststart_tail"])
@pytest.mark.parametrize("backend", VIDEO_BACKENDS)
def test_damaged_files_raise_video_read_error(broken, damage, backend):
    assert_read_error(broken[damage], backend)


@pytest.mark.parametrize("damage", ["empty", "random", "half", "faststart_half", "faststart_tail",
                                    "faststart_boundary"])
def test_pyav_finds_damage_when_opening(broken, damage):
    """The packet index catches truncation at open, before any frame is decoded."""
    with pytest.raises(VideoReadError, match="truncated|cannot open"):
        open_video(broken[damage], "pyav")


@pytest.mark.parametrize("damage", ["faststart_tail", "faststart_boundary"])
@pytest.mark.parametrize("backend", VIDEO_BACKENDS)
def test_a_cut_in_or_between_the_last_packets_is_refused_at_open(broken, damage, backend):
    """decord alone opened these with the full count (failing only on the last frame) or as a video missing a
    frame (real frames, no error, the frames after the gap shifted): both backends now refuse them at open."""
    with pytest.raises(VideoReadError, match="truncated"):
        open_video(broken[damage], backend)


def test_trimmed_mp4_pyav_shows_only_the_frames_after_the_edit_point(videos, reference, tmp_path):
    path = str(tmp_path / "trimmed.mp4")
    first_shown = trimmed_copy(videos["gop4"], path)
    with open_video(path, "pyav") as source:
        assert source.num_frames == NUM_FRAMES - first_shown
        np.testing.assert_array_equal(decode_all(source), reference["gop4"][first_shown:])
        np.testing.assert_array_equal(source.get_frames([5, 0]), reference["gop4"][[first_shown + 5, first_shown]])


def test_trimmed_mp4_is_refused_by_decord(videos, tmp_path):
    """decord counts the hidden frames, so its random access is shifted by them: measured, hence refused."""
    path = str(tmp_path / "trimmed.mp4")
    trimmed_copy(videos["gop4"], path, hidden=2)
    with pytest.raises(VideoReadError, match="2 frames hidden by an mp4 edit list.*backend='pyav'"):
        open_video(path, "decord")


def test_timestamps_that_contradict_the_decoder_switch_to_counted_decoding(tmp_path, videos):
    """The second line of defence: a file whose timestamps passed the open-time checks but disagree with what the
    decoder outputs is read by counting decoded frames, with the right pixels."""
    path = str(tmp_path / "dts_order.mp4")
    remux(videos["gop4"], path, edit=timestamps_in_decoding_order)
    with av.open(path) as container:
        expected = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    with open_video(path, "pyav") as source:
        assert source.counted  # found at open: a reordering codec, timestamps in decoding order
        source._index.untrusted = ""  # pretend the open-time check missed it
        np.testing.assert_array_equal(source.get_frames([9, 2, 30]), expected[[9, 2, 30]])
        assert source.counted and "decoder output" in source._index.untrusted


def test_missing_frames_are_listed_exactly():
    assert _span([0, 4, 8, 28]) == "0, 4, 8, 28"
    assert _span([0, 1, 2, 5, 7, 8]) == "0..2, 5, 7..8"
    assert _span(list(range(0, 40, 2))).endswith("... (20 frames)")


def test_missing_file_says_so(broken):
    for backend in VIDEO_BACKENDS:
        assert assert_read_error(broken["missing"], backend).reason == "no such file"


@pytest.mark.parametrize("backend", VIDEO_BACKENDS)
def test_request_beyond_the_last_frame_raises(videos, backend):
    with open_video(videos["gop4"], backend) as source:
        with pytest.raises(VideoReadError, match=f"frame {NUM_FRAMES} requested but the video has {NUM_FRAMES}"):
            source.get_frames([0, NUM_FRAMES])


@pytest.mark.parametrize("indices", [[], [-1, 2], [0.5]])
def test_malformed_index_requests_are_value_errors(videos, indices):
    with open_video(videos["gop4"], "pyav") as source, pytest.raises(ValueError):
        source.get_frames(indices)


def test_unknown_backend(videos):
    with pytest.raises(ValueError, match="unknown video backend 'opencv'"):
        open_video(videos["gop4"], "opencv")


def test_video_read_error_survives_pickling():
    error = pickle.loads(pickle.dumps(VideoReadError("/data/a.mp4", "no such file")))
    assert (error.path, error.reason, str(error)) == ("/data/a.mp4", "no such file", "/data/a.mp4: no such file")


# --------------------------------------------------------------------------- #
# Folders of JPEG frames
# --------------------------------------------------------------------------- #
def write_frame_folder(folder, count: int, template: str = "img_{:05d}.jpg", first: int = 1) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for offset, frame in enumerate(frames(count)):
        paths.append(str(folder / template.format(first + offset)))
        Image.fromarray(frame).save(paths[-1], quality=90)
    return paths


def test_frames_backend_honours_start_and_count(tmp_path):
    files = write_frame_folder(tmp_path / "clip", 10)  # img_00001.jpg .. img_00010.jpg
    record = VideoRecord(str(tmp_path / "clip"), label=1, start=2, num_frames=5)
    with open_video(record, "frames") as source:
        assert source.num_frames == 5 and np.isnan(source.fps)
        got = source.get_frames([4, 0, 0])
    # frame 0 = img_00003.jpg (first_frame_index 1 + start 2), frame 4 = img_00007.jpg
    expected = np.stack([decode_jpeg_pil(files[index]) for index in (6, 2, 2)])
    np.testing.assert_array_equal(got, expected)


def test_frames_backend_counts_frames_when_the_list_does_not(tmp_path):
    write_frame_folder(tmp_path / "clip", 7)
    (tmp_path / "clip" / "notes.txt").write_text("not a frame")
    with open_video(str(tmp_path / "clip"), "frames") as source:
        assert source.num_frames == 7
        assert decode_all(source).shape == (7, HEIGHT, WIDTH, 3)


def test_frames_backend_custom_template_and_zero_based_numbering(tmp_path):
    files = write_frame_folder(tmp_path / "clip", 6, template="frame{:04d}.jpg", first=0)
    # VideoMAE V2 frame lists: the start column is the first file's number, read with first_frame_index=0.
    record = VideoRecord(str(tmp_path / "clip"), start=1, num_frames=5)
    with open_video(record, "frames", frame_template="frame{:04d}.jpg", first_frame_index=0) as source:
        np.testing.assert_array_equal(source.get_frames([0, 4]), np.stack([decode_jpeg_pil(files[1]),
                                                                              decode_jpeg_pil(files[5])]))


def test_frames_backend_wrong_numbering_fails_at_open_naming_the_files(tmp_path):
    write_frame_folder(tmp_path / "clip", 6, first=0)  # img_00000.jpg .. img_00005.jpg
    record = VideoRecord(str(tmp_path / "clip"), num_frames=6)
    with pytest.raises(VideoReadError, match=r"missing frame file img_00006.jpg .*img_00001.jpg..img_00006.jpg"):
        open_video(record, "frames")  # default first_frame_index=1: one past the last file


def test_frames_backend_missing_or_broken_frame_files(tmp_path):
    folder = tmp_path / "clip"
    files = write_frame_folder(folder, 6)
    os.remove(files[2])
    with open(files[4], "wb") as handle:
        handle.write(b"not a jpeg")
    with open_video(VideoRecord(str(folder), num_frames=6), "frames") as source:
        with pytest.raises(VideoReadError, match="missing frame file img_00003.jpg") as caught:
            source.get_frames([0, 2])
        assert caught.value.path == str(folder)
        with pytest.raises(VideoReadError, match="undecodable frame file img_00005.jpg"):
            source.get_frames([4])
        assert source.get_frames([5]).shape == (1, HEIGHT, WIDTH, 3)


def test_frames_backend_missing_folder_and_bad_template(tmp_path):
    with pytest.raises(VideoReadError, match="no such frame folder"):
        open_video(str(tmp_path / "nowhere"), "frames")
    tmp_path.joinpath("empty").mkdir()
    with pytest.raises(VideoReadError, match="no frame file img_00001.jpg"):
        open_video(str(tmp_path / "empty"), "frames")
    with pytest.raises(ValueError, match="must contain a field"):
        open_video(str(tmp_path / "empty"), "frames", frame_template="frame.jpg")


def test_jpeg_decoders_agree(tmp_path):
    """torchvision (used: faster) and PIL (the fallback) give identical pixels."""
    path = write_frame_folder(tmp_path / "clip", 1)[0]
    np.testing.assert_array_equal(decode_jpeg_torchvision(path), decode_jpeg_pil(path))
