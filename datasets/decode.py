"""Decoding frames behind one interface: a video file through decord or PyAV, or a folder of JPEG frames.

``open_video(record_or_path, backend)`` returns a ``VideoSource`` with ``num_frames``, ``fps`` and
``get_frames(indices) -> uint8 (len(indices), H, W, 3) RGB``, frames in the requested order (indices may repeat
and be unsorted: each distinct frame is decoded once, in file order). Every failure — a file that cannot be
opened, a truncated or undecodable frame, a request beyond the last frame, a missing frame file — raises
``VideoReadError`` naming the path: a broken sample is never turned into garbage frames silently.

Each source decodes on ONE thread. Parallelism comes from DataLoader workers (one video per worker); codec
threads on top of that oversubscribe the cores, and a worker's threads also slow its neighbours.
"""

from __future__ import annotations

import abc
import bisect
import functools
import math
import os
import re
import warnings
from collections.abc import Callable, Sequence
from typing import Literal

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from datasets.annotations import VideoRecord

Backend = Literal["decord", "pyav", "frames"]
BACKENDS = ("decord", "pyav", "frames")
DEFAULT_FRAME_TEMPLATE = "img_{:05d}.jpg"  # VideoMAE's raw-frame names, numbered from 1


class VideoReadError(Exception):
    """A video (or frame folder) that cannot deliver the requested frames; ``path`` and ``reason`` say why."""

    def __init__(self, path: str, reason: str):
        # Both go to Exception's args so the error survives pickling (e.g. out of a worker process).
        super().__init__(path, reason)
        self.path, self.reason = path, reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


class VideoSource(abc.ABC):
    """An opened video: ``num_frames``, ``fps`` (nan where unknown) and ``get_frames``; a context manager."""

    def __init__(self, path: str, num_frames: int, fps: float):
        if num_frames < 1:
            raise VideoReadError(path, "holds no frames")
        self.path, self.num_frames, self.fps = path, num_frames, fps

    def get_frames(self, indices: Sequence[int]) -> np.ndarray:
        """uint8 (len(indices), H, W, 3) RGB frames, in the requested order."""
        distinct, order = self._plan(indices)
        frames = self._read_sorted(distinct)
        if np.array_equal(order, np.arange(len(distinct))):  # sorted and distinct (the usual clip): no copy
            return frames
        return frames[order]

    def _plan(self, indices: Sequence[int]) -> tuple[list[int], np.ndarray]:
        """The distinct indices in file order, and where each requested frame sits among them."""
        wanted = np.asarray(indices)
        if wanted.ndim != 1 or wanted.size == 0 or not np.issubdtype(wanted.dtype, np.integer):
            raise ValueError(f"expected a non-empty sequence of integer frame indices, got {indices!r}")
        if wanted.min() < 0:
            raise ValueError(f"negative frame index {int(wanted.min())} requested from {self.path}")
        if wanted.max() >= self.num_frames:
            raise VideoReadError(self.path, f"frame {int(wanted.max())} requested but the video has "
                                            f"{self.num_frames} frames (indices start at 0)")
        distinct, order = np.unique(wanted, return_inverse=True)
        return distinct.tolist(), order

    @abc.abstractmethod
    def _read_sorted(self, indices: list[int]) -> np.ndarray:
        """Frames for distinct, increasing, in-range indices."""

    def close(self) -> None:
        pass

    def __enter__(self) -> VideoSource:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, num_frames={self.num_frames}, fps={self.fps})"


def open_video(record_or_path: VideoRecord | str | os.PathLike, backend: Backend = "decord", *,
               frame_template: str = DEFAULT_FRAME_TEMPLATE, first_frame_index: int = 1) -> VideoSource:
    """Open a video file (``decord``, ``pyav``) or a folder of JPEG frames (``frames``).

    For ``frames``, frame ``i`` is the file ``frame_template.format(first_frame_index + record.start + i)``;
    ``record.num_frames`` (or, when unknown, the run of consecutive files) gives the frame count.
    ``first_frame_index`` is 1 for VideoMAE's SSv2 frames (img_00001.jpg first); VideoMAE V2 frame lists give
    the first file's number as their start column, so read those with ``first_frame_index=0``.
    """
    if isinstance(record_or_path, VideoRecord):
        path, start, num_frames = record_or_path.path, record_or_path.start, record_or_path.num_frames
    else:
        path, start, num_frames = os.fspath(record_or_path), 0, None
    if backend == "decord":
        return DecordSource(path)
    if backend == "pyav":
        return PyAVSource(path)
    if backend == "frames":
        return FrameFolderSource(path, first_number=first_frame_index + start, num_frames=num_frames,
                                 template=frame_template)
    raise ValueError(f"unknown video backend {backend!r}; expected one of {', '.join(BACKENDS)}")


def decode_all(source: VideoSource) -> np.ndarray:
    """Every frame of ``source`` (tests and small clips: a long video does not fit in memory)."""
    return source.get_frames(range(source.num_frames))


def _require_file(path: str) -> None:
    # Checked up front: the decoders' own messages for a missing file are cryptic or say "invalid data".
    if not os.path.isfile(path):
        raise VideoReadError(path, "no such file")


def _stack(frames: list[np.ndarray], path: str) -> np.ndarray:
    try:
        return np.stack(frames)
    except ValueError:
        sizes = sorted({frame.shape for frame in frames})
        raise VideoReadError(path, f"frames of different sizes {sizes}") from None


def _short(error: BaseException) -> str:
    """A decoder's message, readable: decord prefixes '[hh:mm:ss] file.cc:line: ' and appends a stack trace."""
    text = str(error).strip()
    first_line = re.sub(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ", "", text.splitlines()[0]) if text else ""
    return first_line[:300] or type(error).__name__


# --------------------------------------------------------------------------- #
# decord
# --------------------------------------------------------------------------- #
class DecordSource(VideoSource):
    """decord's VideoReader: it indexes all packets at open and seeks to the keyframe before each batch.

    Measured limits, where the PyAV backend is exact: a file cut inside its last packet opens with the full
    frame count and raises VideoReadError only for frames near the cut; a file cut exactly between two packets
    reads as a video missing one frame (real frames, no error); an mp4 trimmed by an edit list is refused.
    """

    def __init__(self, path: str):
        import decord  # not importable on every platform; PyAV and frame folders work without it

        _require_file(path)
        self._errors = (decord.DECORDError, RuntimeError)
        try:
            self._reader = decord.VideoReader(path, num_threads=1)
            num_frames, fps = len(self._reader), float(self._reader.get_avg_fps())
        except self._errors as error:
            raise VideoReadError(path, f"cannot open ({_short(error)})") from None
        super().__init__(path, num_frames, fps)
        self._refuse_hidden_frames()

    def _refuse_hidden_frames(self) -> None:
        """An mp4 trimmed by an edit list (``ffmpeg -ss ... -c copy``) starts with frames decoded only as
        references, at negative timestamps. decord counts them as frames and then returns shifted frames on
        random access and repeats the last frame at the end (measured), so such a file is refused here."""
        starts = self._reader.get_frame_timestamp(list(range(self.num_frames)))[:, 0]
        hidden = int(np.count_nonzero(starts < 0))
        if hidden:
            raise VideoReadError(self.path, f"starts with {hidden} frames hidden by an edit list, which decord "
                                            "mis-indexes; read it with backend='pyav'")

    def _read_sorted(self, indices: list[int]) -> np.ndarray:
        try:
            batch = self._reader.get_batch(indices)
        except self._errors as error:
            raise VideoReadError(self.path, f"cannot decode frames {_span(indices)} ({_short(error)})") from None
        # get_batch follows decord's global bridge: NDArray by default, a tensor if someone set another.
        frames = batch.asnumpy() if hasattr(batch, "asnumpy") else np.asarray(batch)
        if len(frames) != len(indices):
            raise VideoReadError(self.path, f"decoded {len(frames)} frames for {len(indices)} requested")
        return frames

    def close(self) -> None:
        self._reader = None


def _span(indices: list[int]) -> str:
    return f"{indices[0]}..{indices[-1]}" if len(indices) > 1 else str(indices[0])


# --------------------------------------------------------------------------- #
# PyAV
# --------------------------------------------------------------------------- #
class PyAVSource(VideoSource):
    """PyAV (FFmpeg) with a packet index built at open, like decord's.

    Frame count: the index's count of shown packets, not ``stream.frames``. Demuxing reads the file without
    decoding it (open + index: about 2 ms for a 10 s, 1 MB clip) and gives (1) an exact count for every
    container — webm/mkv headers carry none, duration x rate is only an estimate, and frames hidden by an mp4
    edit list are not shown — equal to decord's on ordinary files, (2) each frame's timestamp, so a read seeks
    to the keyframe before its first frame instead of decoding from the start, and (3) truncation found at
    open: a damaged last packet, or fewer packets than the mp4 header lists.
    Files whose packets lack unique timestamps are decoded from the start and frames counted as they come.
    """

    def __init__(self, path: str):
        _require_file(path)
        try:
            self._container = av.open(path)
        except (av.FFmpegError, OSError) as error:
            raise VideoReadError(path, f"cannot open ({_short(error)})") from None
        try:
            self._stream = self._open_stream(path)
            self._pts, self._keyframe_pts = _index_packets(self._container, self._stream, path)
            super().__init__(path, len(self._pts), _stream_fps(self._stream))
        except BaseException:
            self._container.close()
            raise
        # Frame index = rank of the presentation timestamp; None: no usable timestamps, count decoded frames.
        self._index_of_pts = {pts: index for index, pts in enumerate(self._pts)} if self._keyframe_pts else None
        # One converter for all frames: frame.to_ndarray() builds a new swscale context for every frame, which
        # costs more than the conversion itself (0.46 vs 0.13 ms per 256x320 frame, identical pixels).
        self._reformatter = VideoReformatter()

    def _open_stream(self, path: str):
        if not self._container.streams.video:
            raise VideoReadError(path, "no video stream")
        stream = self._container.streams.video[0]
        stream.codec_context.thread_count = 1  # one thread per worker (see the module's docstring)
        return stream

    def _read_sorted(self, indices: list[int]) -> np.ndarray:
        wanted, last, found = set(indices), indices[-1], {}
        try:
            for index, frame in self._decoded_from(indices[0], wanted):
                if index in wanted:  # convert only the frames kept
                    found[index] = self._reformatter.reformat(frame, format="rgb24").to_ndarray()
                if index >= last:
                    break
        except av.FFmpegError as error:
            raise VideoReadError(self.path, f"cannot decode frames {_span(indices)} ({_short(error)})") from None
        missing = [index for index in indices if index not in found]
        if missing:
            raise VideoReadError(self.path, f"frames {_span(missing)} were not produced by the decoder")
        return _stack([found[index] for index in indices], self.path)

    def _decoded_from(self, first: int, wanted: set[int]):
        """(frame index, frame) from at or before frame ``first`` onwards, in presentation order.

        Frames that are neither wanted nor referenced by other frames are not decoded at all: before each
        packet the decoder is told whether it may drop the packet's frame if it is a non-reference one
        (x264's default GOP makes about half of all frames such B-frames). Wanted and reference frames are
        decoded exactly as in a full decode, so the pixels are identical.
        """
        if self._index_of_pts is None:
            yield from enumerate(self._decode_from_start())
            return
        target = self._pts[first]
        position = bisect.bisect_right(self._keyframe_pts, target) - 1
        self._container.seek(self._keyframe_pts[max(position, 0)], stream=self._stream, backward=True)
        wanted_pts = {self._pts[index] for index in wanted}
        codec = self._stream.codec_context
        try:
            for packet in self._container.demux(self._stream):
                codec.skip_frame = "DEFAULT" if packet.pts is None or packet.pts in wanted_pts else "NONREF"
                for frame in packet.decode():
                    index = self._index_of_pts.get(frame.pts)
                    # Leading frames of an open GOP (timestamps before the keyframe) may be garbage; they are
                    # never wanted here, since every wanted frame's timestamp is at or after the keyframe's.
                    if index is not None:
                        yield index, frame
        finally:
            codec.skip_frame = "DEFAULT"

    def _decode_from_start(self):
        # Without timestamps a seek cannot be placed: reopen and decode from the first frame.
        self._container.close()
        self._container = av.open(self.path)
        self._stream = self._open_stream(self.path)
        yield from self._container.decode(self._stream)

    def close(self) -> None:
        self._container.close()


def _index_packets(container, stream, path: str) -> tuple[list, list]:
    """Sorted presentation timestamps of all frames, and of the keyframes ([] where unusable)."""
    pts, keyframe_pts, packets = [], [], 0
    try:
        for packet in container.demux(stream):
            if packet.size == 0:  # the demuxer's final empty packet, which only flushes the decoder
                continue
            if packet.is_corrupt:
                raise VideoReadError(path, f"truncated or corrupt: packet {packets} is damaged")
            packets += 1
            if packet.is_keyframe:  # a hidden keyframe is still where decoding of the frames after it starts
                keyframe_pts.append(packet.pts)
            if not packet.is_discard:  # discarded: decoded for reference only, trimmed by an mp4 edit list
                pts.append(packet.pts)
    except av.FFmpegError as error:
        raise VideoReadError(path, f"truncated or unreadable after packet {packets} ({_short(error)})") from None
    # The mp4 header counts every sample, shown or not; a cut exactly between two packets only shows here.
    if stream.frames and packets < stream.frames:
        raise VideoReadError(path, f"truncated: the header lists {stream.frames} frames, the file holds {packets}")
    if None in pts or None in keyframe_pts or len(set(pts)) != len(pts):
        return pts, []
    return sorted(pts), sorted(keyframe_pts)


def _stream_fps(stream) -> float:
    rate = stream.average_rate or stream.guessed_rate
    return float(rate) if rate else math.nan


# --------------------------------------------------------------------------- #
# Folder of JPEG frames
# --------------------------------------------------------------------------- #
class FrameFolderSource(VideoSource):
    """Frame ``i`` is ``folder/template.format(first_number + i)``; fps is nan (JPEG folders carry none)."""

    def __init__(self, folder: str, *, first_number: int, num_frames: int | None, template: str):
        _check_template(template)
        if not os.path.isdir(folder):
            raise VideoReadError(folder, "no such frame folder")
        self._template, self._first_number = template, first_number
        if num_frames is None:
            num_frames = self._count_frames(folder)
        super().__init__(folder, num_frames, math.nan)
        self._check_ends()

    def _count_frames(self, folder: str) -> int:
        """The run of consecutive frame files from the first number on (the list gave no frame count)."""
        names, count = set(os.listdir(folder)), 0
        while self._template.format(self._first_number + count) in names:
            count += 1
        if count == 0:
            raise VideoReadError(folder, f"no frame file {self._template.format(self._first_number)}")
        return count

    def _check_ends(self) -> None:
        # Two stat calls at open turn a wrong template, first_frame_index or start into an error naming the
        # expected files, instead of an off-by-one that reads the wrong frames (or fails only near the end).
        for index in (0, self.num_frames - 1):
            if not os.path.isfile(self._frame_path(index)):
                raise VideoReadError(self.path, f"missing frame file {os.path.basename(self._frame_path(index))} "
                                                f"(frames expected: {self._expected_names()})")

    def _expected_names(self) -> str:
        first, last = self._frame_path(0), self._frame_path(self.num_frames - 1)
        return f"{os.path.basename(first)}..{os.path.basename(last)}"

    def _frame_path(self, index: int) -> str:
        return os.path.join(self.path, self._template.format(self._first_number + index))

    def _read_sorted(self, indices: list[int]) -> np.ndarray:
        decode = jpeg_decoder()
        return _stack([self._read_frame(self._frame_path(index), decode) for index in indices], self.path)

    def _read_frame(self, path: str, decode: Callable[[str], np.ndarray]) -> np.ndarray:
        try:
            return decode(path)
        except (OSError, RuntimeError, ValueError) as error:
            if not os.path.isfile(path):
                raise VideoReadError(self.path, f"missing frame file {os.path.basename(path)}") from None
            raise VideoReadError(self.path, f"undecodable frame file {os.path.basename(path)} "
                                            f"({_short(error)})") from None


def _check_template(template: str) -> None:
    # A template without a field would name the same file for every frame: a silent still image.
    try:
        distinct = template.format(0) != template.format(1)
    except (IndexError, KeyError, ValueError) as error:
        raise ValueError(f"frame_template {template!r} must take one number, like 'img_{{:05d}}.jpg'") from error
    if not distinct:
        raise ValueError(f"frame_template {template!r} must contain a field for the frame number")


def decode_jpeg_torchvision(path: str) -> np.ndarray:
    """torchvision's libjpeg-turbo decoder: ~1.6x faster than PIL on 240x427 frames, identical pixels."""
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    return decode_jpeg(read_file(path), mode=ImageReadMode.RGB).permute(1, 2, 0).numpy()


def decode_jpeg_pil(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@functools.cache
def jpeg_decoder() -> Callable[[str], np.ndarray]:
    """torchvision's decoder where it exists, else PIL's (same pixels).

    torchvision 0.29 deprecates its image decoders in favour of TorchCodec and warns on every call: that one
    warning is silenced, and PIL takes over once torchvision drops them. Imported on first use, because
    importing torchvision.io takes seconds and runs where no frame folder is read.
    """
    try:
        from torchvision.io import decode_jpeg, read_file  # noqa: F401
    except ImportError:
        return decode_jpeg_pil
    warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                            category=DeprecationWarning)
    return decode_jpeg_torchvision
