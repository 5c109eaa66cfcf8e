"""AVA clips read straight from the video files by timestamp (``AVAClipConfig.source = "video"``).

Two independent references: FFmpeg's own fps filter, which is what ``ffmpeg -r 30`` extraction of AVA's frames
runs, decides which frame each tick of the clip's time grid shows, on files built to break timing (B-frames,
variable frame rate, AVI, an mp4 edit list, a 60 fps file thinned to 30); and the frame folders themselves: a
video written losslessly from a synthetic AVA frame folder yields, keyframe for keyframe, the same training and
test items (pixels and boxes) as the folder, also when the file starts earlier than the folder (a whole movie).
"""

import json
import os
import pickle
import shutil
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from datasets.ava.dataset import AVAClipConfig, AVAKeyframes, Keyframe, frames_at_ticks, group_keyframes
from datasets.ava.files import read_ava_csv
from datasets.decode import open_video
from datasets.synthetic.ava import SyntheticAVASpec, ensure_synthetic_ava
from datasets.video_dataset import Failure

import video_corpus as corpus

SPEC = SyntheticAVASpec(num_videos=4, num_val_videos=1, seconds=4)


# ---- which frame each tick shows: against FFmpeg's fps filter ---------------------------------------------------


def fps_filter_output(path: str, rate: int) -> list[tuple[int, np.ndarray]]:
    """(tick from the first output frame, RGB frame) of every frame FFmpeg's ``fps=rate`` filter outputs over a
    full decode of ``path``."""
    frames = []
    with av.open(path) as container:
        stream = container.streams.video[0]
        graph = av.filter.Graph()
        source, fps, sink = graph.add_buffer(template=stream), graph.add("fps", f"fps={rate}"), graph.add("buffersink")
        source.link_to(fps)
        fps.link_to(sink)
        graph.configure()

        def drain():
            while True:
                try:
                    frames.append(graph.pull())
                except (av.BlockingIOError, av.EOFError):
                    return

        for frame in container.decode(stream):
            graph.push(frame)
            drain()
        graph.push(None)
        drain()
    first = frames[0].pts
    return [(frame.pts - first, frame.to_ndarray(format="rgb24")) for frame in frames]


@pytest.fixture(scope="module")
def timing_corpus(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("timing"))
    p = lambda name: os.path.join(folder, name)  # noqa: E731
    bframes = corpus.encode(p("bframes.mp4"), "libx264", options={**corpus.X264, "bf": "3"}, gop=12)
    return {
        "mp4_bframes": bframes,
        "mp4_vfr": corpus.encode(p("vfr.mp4"), "libx264", options={**corpus.X264, "bf": "2"}, gop=12,
                                 pts=corpus.irregular_pts(), time_base=Fraction(1, corpus.FPS)),
        "avi_vfr": corpus.encode(p("vfr.avi"), "mjpeg", pix_fmt="yuvj420p", pts=corpus.irregular_pts(seed=1),
                                 time_base=Fraction(1, corpus.FPS)),
        "mp4_edit_list": corpus.remux(bframes, p("edit_list.mp4"), edit=corpus.trimmed_by_edit_list),
        "mkv_60fps": corpus.encode(p("60fps.mkv"), "libx264", options={**corpus.X264, "bf": "3"}, rate=60),
        "webm_vp9": corpus.encode(p("vp9.webm"), "libvpx-vp9", options={"crf": "30", "b": "0", "cpu-used": "8",
                                                                          "deadline": "realtime"}, gop=16),
    }


@pytest.mark.parametrize("name", ["mp4_bframes", "mp4_vfr", "avi_vfr", "mp4_edit_list", "mkv_60fps", "webm_vp9"])
@pytest.mark.parametrize("rate", [30, 10])
def test_each_tick_shows_the_frame_ffmpegs_fps_filter_outputs(timing_corpus, name, rate):
    path = timing_corpus[name]
    truth = corpus.reference_frames(path)
    with open_video(path, "pyav") as video:
        starts = video.frame_times()
        assert len(starts) == len(truth)
    output = fps_filter_output(path, rate)
    ticks = np.array([tick for tick, _ in output])
    assert np.array_equal(ticks, np.arange(len(output)))  # one frame per tick, none skipped
    chosen = frames_at_ticks(ticks, starts, rate)
    for (tick, expected), index in zip(output, chosen):
        assert np.array_equal(truth[index], expected), f"{name} at {rate} fps: tick {tick} -> frame {index}"


def test_frame_times_follow_a_variable_frame_rate_and_start_at_zero(timing_corpus):
    pts = corpus.irregular_pts()
    with open_video(timing_corpus["mp4_vfr"], "pyav") as video:
        assert np.allclose(video.frame_times(), np.array(pts) / corpus.FPS)
    with open_video(timing_corpus["mp4_edit_list"], "pyav") as video:  # hidden frames lie before 0: not counted
        times = video.frame_times()
        assert times[0] == 0 and np.allclose(np.diff(times), 1 / corpus.FPS)


def test_ticks_before_and_after_the_video_clamp_to_its_ends():
    starts = np.array([0.0, 0.04, 0.08])
    assert frames_at_ticks(np.array([-3, 0, 1, 2, 3, 40]), starts, 25).tolist() == [0, 0, 1, 2, 2, 2]
    # halves round away from zero: a frame starting half a tick early is the one shown at that tick
    assert frames_at_ticks(np.array([0, 1]), np.array([0.0, 0.5 / 30]), 30).tolist() == [0, 1]


# ---- the dataset from video files equals the dataset from frame folders ------------------------------------------


def write_lossless_video(path: str, frames: np.ndarray, fps: int) -> None:
    """FFV1 in Matroska, RGB kept exactly, so the decoded video equals the frames."""
    with av.open(path, "w") as container:
        stream = container.add_stream("ffv1", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "bgr0"
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())


@pytest.fixture(scope="module")
def synthetic_videos(tmp_path_factory):
    """The synthetic AVA frames, and each video's frames as a lossless file: ``videos/`` starts where the frame
    folders do (second 900), ``movies/`` two seconds earlier (first_second 898; the lead-in is black)."""
    root = tmp_path_factory.mktemp("ava_video")
    paths = ensure_synthetic_ava(root, SPEC)
    for video_id in sorted(os.listdir(root / "frames")):
        with open_video(root / "frames" / video_id, "frames", frame_template=f"{video_id}_{{:06d}}.jpg") as folder:
            frames = folder.get_frames(list(range(folder.num_frames)))
        for name, lead_in in (("videos", 0), ("movies", 2 * SPEC.fps)):
            os.makedirs(root / name, exist_ok=True)
            padded = np.concatenate([np.zeros((lead_in, *frames.shape[1:]), np.uint8), frames])
            write_lossless_video(str(root / name / f"{video_id}.mkv"), padded, SPEC.fps)
    return root, paths


def both_sources(root, **overrides):
    base = dict(fps=SPEC.fps, clip_len=8, sampling_rate=2, train_short_side=64, crop=64, test_short_side=64,
                num_classes=7, box_jitter=(0.2, 0.1, 0.1, 0.05))
    return AVAClipConfig(**base), AVAClipConfig(**{**base, "source": "video", **overrides})


@pytest.mark.parametrize("videos_dir, first_second", [("videos", 900), ("movies", 898)])
@pytest.mark.parametrize("train", [True, False])
def test_video_files_give_the_items_of_the_frame_folders(synthetic_videos, videos_dir, first_second, train):
    root, paths = synthetic_videos
    split = paths.split("train" if train else "val")
    table = read_ava_csv(split["csv"] if train else split["detections"], kind="groundtruth" if train else "detections")
    keyframes = group_keyframes(table, 7)
    frames_cfg, video_cfg = both_sources(root, videos_dir=videos_dir, first_second=first_second)
    from_frames = AVAKeyframes(root, keyframes, frames_cfg, train=train, seed=3)
    from_video = AVAKeyframes(root, keyframes, video_cfg, train=train, seed=3)
    # the first and last keyframes' clips run past the frames the folders hold: both clamp alike
    for index in sorted({0, 1, len(keyframes) // 2, len(keyframes) - 1}):
        expected, got = from_frames[index], from_video[index]
        assert not isinstance(got, Failure), got
        for key in ("video", "boxes", "labels", "scores"):
            assert np.array_equal(got[key].numpy(), expected[key].numpy()), (index, key)


def test_decord_reads_the_same_clips(synthetic_videos):
    pytest.importorskip("decord")
    root, paths = synthetic_videos
    keyframes = group_keyframes(read_ava_csv(paths.split("val")["detections"], kind="detections"), 7)
    pyav_cfg, _ = both_sources(root)
    _, decord_cfg = both_sources(root, video_backend="decord")
    pyav_cfg.source = "video"
    for index in (0, len(keyframes) - 1):
        got = AVAKeyframes(root, keyframes, decord_cfg, train=False)[index]
        expected = AVAKeyframes(root, keyframes, pyav_cfg, train=False)[index]
        assert np.array_equal(got["video"].numpy(), expected["video"].numpy())


def test_missing_doubled_and_too_short_videos_are_named_failures(synthetic_videos, tmp_path):
    root, _ = synthetic_videos
    copy = tmp_path / "copy"
    shutil.copytree(root / "videos", copy / "videos")
    ids = sorted(name[:-4] for name in os.listdir(copy / "videos"))
    os.remove(copy / "videos" / f"{ids[0]}.mkv")
    shutil.copy(copy / "videos" / f"{ids[1]}.mkv", copy / "videos" / f"{ids[1]}.mp4")
    _, cfg = both_sources(copy)
    boxes, labels, scores = np.array([[0.1, 0.1, 0.5, 0.5]], np.float32), np.zeros((1, 7), np.float32), np.ones(1)
    keyframes = [Keyframe(ids[0], 902, boxes, labels, scores), Keyframe(ids[1], 902, boxes, labels, scores),
                 Keyframe(ids[2], 2000, boxes, labels, scores), Keyframe(ids[2], 899, boxes, labels, scores)]
    dataset = AVAKeyframes(copy, keyframes, cfg, train=False)
    missing, doubled, late, early = (dataset[i] for i in range(4))
    assert isinstance(missing, Failure) and f"{ids[0]}.*" in missing.path and "no such video file" in missing.reason
    assert isinstance(doubled, Failure) and f"{ids[1]}.mkv" in doubled.reason and f"{ids[1]}.mp4" in doubled.reason
    for failure, second in ((late, 2000), (early, 899)):
        assert isinstance(failure, Failure) and f"{ids[2]},{second:04d}" in failure.reason
        assert "first second 900" in failure.reason and "which shows 0-" in failure.reason


def test_synthetic_spec_fps_is_what_the_videos_were_written_at(synthetic_videos):
    root, paths = synthetic_videos
    assert json.loads(paths.meta.read_text())["fps"] == SPEC.fps
    with open_video(root / "videos" / f"{sorted(os.listdir(root / 'frames'))[0]}.mkv", "pyav") as video:
        assert video.fps == SPEC.fps and video.num_frames == SPEC.num_frames


def test_the_synthetic_dataset_can_come_as_h264_videos_read_by_timestamp(tmp_path):
    """``SyntheticAVASpec(videos=True)``: lossy H.264 files beside the JPEG frames. Each clip read by timestamp is
    the folder's clip up to coding noise: of the folder's clips shifted by -2..2 frames, the unshifted one is the
    closest (actors move from frame to frame)."""
    paths = ensure_synthetic_ava(tmp_path, SyntheticAVASpec(num_videos=2, num_val_videos=1, seconds=3, videos=True))
    assert sorted(os.listdir(paths.videos_dir)) == ["ava-syn_000.mp4", "ava-syn_001.mp4"]
    keyframes = group_keyframes(read_ava_csv(paths.val_csv, kind="groundtruth"), 7)
    frames_cfg, video_cfg = both_sources(tmp_path, sampling_rate=1)
    frames_cfg.sampling_rate = 1  # consecutive frames: a clip one frame off is a shifted window of this one
    from_frames = AVAKeyframes(tmp_path, keyframes, frames_cfg, train=False)
    from_video = AVAKeyframes(tmp_path, keyframes, video_cfg, train=False)
    for index in range(len(keyframes)):
        got, folder = from_video[index]["video"].float(), from_frames[index]["video"].float()  # (C, 8, H, W)
        distance = {shift: float((got[:, 2:6] - folder[:, 2 + shift:6 + shift]).abs().mean()) for shift in range(-2, 3)}
        assert min(distance, key=distance.get) == 0, (index, distance)


def test_a_video_left_open_is_closed_before_the_loader_forks_its_workers(synthetic_videos):
    root, paths = synthetic_videos
    keyframes = group_keyframes(read_ava_csv(paths.split("train")["csv"], kind="groundtruth"), 7)
    _, cfg = both_sources(root)
    dataset = AVAKeyframes(root, keyframes, cfg, train=False)
    expected = [dataset[i]["video"] for i in range(len(keyframes))]  # leaves the last video open here
    loader = DataLoader(dataset, batch_size=None, num_workers=2, multiprocessing_context="fork", timeout=60)
    for item, clip in zip(loader, expected):
        assert torch.equal(item["video"], clip)
    pickle.loads(pickle.dumps(dataset))[0]  # what a spawned worker gets: no open file, reopened on first use
