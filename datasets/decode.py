"""Decoding frames behind one interface: a video file through PyAV or decord, or a folder of JPEG frames.

``open_video(record_or_path, backend)`` returns a ``VideoSource`` with ``num_frames``, ``fps`` and
``get_frames(indices) -> uint8 (len(indices), H, W, 3) RGB``, frames in the requested order (indices may repeat
and be unsorted: each distinct frame is decoded once, in file order).

Frame ``i`` of a video file is the ``i``-th frame of FFmpeg's own sequential decode of it (every frame its decoder
outputs, in display order, no seeking). Against that definition, on a corpus of files built to break decoders
(tests/video_corpus.py: B-frames with timestamps in decoding order, open GOPs, variable frame rate, AVI with four
codecs, mkv, webm, mov, edit lists, streams without a leading keyframe, cuts at many offsets, damaged payloads),
a read either returns exactly those frames or raises ``VideoReadError`` naming the path and the reason. Policies:

- a truncated file (shorter than its container declares, or missing packets its mp4 header lists) is refused
  at open, never read up to its cut: the frames around a cut are half-decoded;
- a frame the decoder flags as damaged fails the read that decodes it (PyAV); payload damage that no decoder
  notices cannot be told from a real picture by anyone;
- a request beyond the last frame, a missing file or frame file, an unknown container: ``VideoReadError``.

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
import struct
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from datasets.annotations import VideoRecord

Backend = Literal["pyav", "decord", "frames"]
BACKENDS = ("pyav", "decord", "frames")
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

    def frame_times(self) -> np.ndarray:
        """float64 (num_frames,): when each frame starts being shown, in seconds from the first frame. Here: a
        constant rate of ``fps``; video files whose timestamps can be trusted give their own (variable rates)."""
        if not math.isfinite(self.fps) or self.fps <= 0:
            raise VideoReadError(self.path, "has no frame rate, so its frames cannot be placed in time")
        return np.arange(self.num_frames, dtype=np.float64) / self.fps

    def close(self) -> None:
        pass

    def __enter__(self) -> VideoSource:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, num_frames={self.num_frames}, fps={self.fps})"


def open_video(record_or_path: VideoRecord | str | os.PathLike, backend: Backend = "pyav", *,
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
# What the container says, before any frame is decoded
# --------------------------------------------------------------------------- #
@dataclass
class StreamIndex:
    """What demuxing a file (reading its packets without decoding them) tells about its video stream.

    ``pts``: presentation timestamps of the frames shown, sorted: frame ``i`` is the one at ``pts[i]`` — valid
    only when ``seekable``. ``untrusted``: why the timestamps cannot say which frame is which (then frames are
    counted as the decoder outputs them, decoding from the start). ``open_gop``: a decode that starts at some
    keyframe may depend on frames before it — a frame that follows the keyframe in decoding order is shown before
    it, an H.264/HEVC keyframe is not an IDR picture, or the codec reorders frames and has no such proof.
    """

    pts: list[int]
    keyframe_pts: list[int]
    time_base: Fraction
    untrusted: str = ""
    open_gop: bool = False
    hidden: int = 0  # frames decoded only as references, hidden by an mp4 edit list

    @property
    def seekable(self) -> bool:
        return not self.untrusted


def inspect_stream(path: str) -> StreamIndex:
    """Index the packets of ``path``'s first video stream, refusing files that are truncated or damaged at the
    container level (VideoReadError). About 2 ms for a 10 s, 1 MB clip: no frame is decoded."""
    with _open_container(path) as container:
        return _inspect_container(container, path)


def _open_container(path: str):
    _require_file(path)
    try:
        return av.open(path)
    except (av.FFmpegError, OSError) as error:
        raise VideoReadError(path, f"cannot open ({_short(error)})") from None


def _inspect_container(container, path: str) -> StreamIndex:
    _check_declared_size(path, container.format.name)
    return _index_packets(container, _video_stream(container, path), path)


def _video_stream(container, path: str):
    if not container.streams.video:
        raise VideoReadError(path, "no video stream")
    stream = container.streams.video[0]
    stream.codec_context.thread_count = 1  # one thread per worker (see the module's docstring)
    return stream


def _index_packets(container, stream, path: str) -> StreamIndex:
    packets = []  # (pts, is_keyframe, is_discard) in decoding order
    idr_check = _IdrCheck.for_stream(stream)
    all_keyframes_idr = idr_check is not None
    try:
        for packet in container.demux(stream):
            if packet.size == 0:  # the demuxer's final empty packet, which only flushes the decoder
                continue
            if packet.is_corrupt:
                raise VideoReadError(path, f"truncated or corrupt: packet {len(packets)} is damaged")
            packets.append((packet.pts, packet.is_keyframe, packet.is_discard))
            if packet.is_keyframe and all_keyframes_idr:
                all_keyframes_idr = idr_check.is_idr(bytes(packet))
    except av.FFmpegError as error:
        raise VideoReadError(path, f"truncated or unreadable after packet {len(packets)} ({_short(error)})") from None
    # An mp4 header counts every sample: a cut exactly between two packets shows only here. (An AVI header may
    # count time ticks rather than frames when its frames are irregularly spaced, so it proves nothing.)
    if "mp4" in container.format.name and stream.frames and len(packets) < stream.frames:
        raise VideoReadError(path, f"truncated: the header lists {stream.frames} frames, the file holds "
                                   f"{len(packets)}")
    timed = None not in (pts for pts, _, _ in packets)  # else no order to sort by: frames are counted instead
    shown = sorted(pts for pts, _, discard in packets if not discard) if timed else []
    keyframes = sorted(pts for pts, key, _ in packets if key) if timed else []
    closed = all_keyframes_idr or (idr_check is None and not stream.codec_context.has_b_frames)
    return StreamIndex(shown, keyframes, stream.time_base, untrusted=_untrusted(packets, stream),
                       open_gop=not closed or _has_leading_frames(packets),
                       hidden=sum(discard for _, _, discard in packets))


def _untrusted(packets: list, stream) -> str:
    """Why the timestamps cannot place each frame, or '' when they can."""
    if not packets:
        return "no packets"
    pts = [pts for pts, _, _ in packets]
    if None in pts:
        return "packets without timestamps"
    if len(set(pts)) != len(pts):
        return "repeated timestamps"
    if not packets[0][1]:
        # The decoder drops, or invents, the frames before its first keyframe: only decoding tells how many.
        return "the stream does not start with a keyframe"
    if stream.codec_context.has_b_frames and pts == sorted(pts):
        # A codec that reorders frames, timestamps that never do: they were written in decoding order (AVI has
        # no presentation times; some muxers write none), so sorting them misplaces every B-frame.
        return "timestamps in decoding order for a codec that reorders frames"
    return ""


def _has_leading_frames(packets: list) -> bool:
    keyframe_pts = None
    for pts, key, _ in packets:
        if key:
            keyframe_pts = pts
        elif keyframe_pts is not None and pts is not None and pts < keyframe_pts:
            return True
    return False


@dataclass
class _IdrCheck:
    """Whether an H.264 / HEVC keyframe packet holds an IDR picture, which nothing after it refers past. x264's
    open-GOP keyframes are recovery-point I pictures instead: measured, decord returns a wrong frame after seeking
    to one."""

    codec: str
    length_size: int | None  # NAL units prefixed by their length (mp4, mkv), or None: start codes (ts, avi)

    @classmethod
    def for_stream(cls, stream) -> _IdrCheck | None:
        codec = stream.codec_context.name
        if codec not in ("h264", "hevc"):
            return None
        extra = stream.codec_context.extradata or b""
        if extra[:1] != b"\x01":  # no avcC / hvcC configuration record: Annex B start codes
            return cls(codec, None)
        field = 4 if codec == "h264" else 21  # the byte holding lengthSizeMinusOne in its low two bits
        return cls(codec, (extra[field] & 3) + 1 if len(extra) > field else 4)

    def is_idr(self, data: bytes) -> bool:
        for header in self._nal_headers(data):
            kind = header & 0x1F if self.codec == "h264" else (header >> 1) & 0x3F
            if (self.codec == "h264" and kind == 5) or (self.codec == "hevc" and kind in (19, 20)):
                return True
        return False

    def _nal_headers(self, data: bytes):
        if self.length_size is None:
            position = data.find(b"\x00\x00\x01")
            while 0 <= position < len(data) - 3:
                yield data[position + 3]
                position = data.find(b"\x00\x00\x01", position + 3)
            return
        position, size = 0, self.length_size
        while position + size < len(data):
            length = int.from_bytes(data[position:position + size], "big")
            yield data[position + size]
            position += size + length


def _check_declared_size(path: str, format_name: str) -> None:
    """A file shorter than its container says was cut short (an interrupted download or copy): refused.

    Decoders read such files without an error and return fewer frames or, at the cut, a half-decoded one."""
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        declared = _declared_size(handle, size, format_name)
    if declared is not None and declared > size:
        raise VideoReadError(path, f"truncated: the container declares {declared} bytes, the file has {size}")


def _declared_size(handle, size: int, format_name: str) -> int | None:
    """The byte count the container's own framing promises, or None where it promises nothing."""
    head = handle.read(16)
    if head[:4] == b"RIFF":  # AVI: the first RIFF chunk's size (OpenDML files add AVIX chunks after it)
        return 8 + struct.unpack("<I", head[4:8])[0]
    if head[:4] == b"\x1a\x45\xdf\xa3":  # Matroska / WebM: the EBML header, then the Segment's size
        return _ebml_segment_end(handle)
    if "mp4" in format_name:  # ISO BMFF: top-level boxes follow each other to the end of the file
        return _last_box_end(handle, size)
    if format_name == "mpegts":  # 188-byte transport packets (192 in M2TS): a cut leaves a partial one
        return size if size % 188 == 0 or size % 192 == 0 else size + 1
    return None


def _read_vint(handle, keep_marker: bool) -> tuple[int | None, int]:
    """One EBML variable-length integer: (value or None when 'unknown', length in bytes)."""
    first = handle.read(1)
    if not first:
        raise EOFError
    length = 9 - first[0].bit_length()
    if length > 8:
        raise ValueError("invalid EBML integer")
    value = first[0] if keep_marker else first[0] & ((1 << (8 - length)) - 1)
    for byte in handle.read(length - 1):
        value = (value << 8) | byte
    unknown = not keep_marker and value == (1 << (7 * length)) - 1
    return (None if unknown else value), length


def _ebml_segment_end(handle) -> int | None:
    try:
        handle.seek(0)
        _read_vint(handle, keep_marker=True)  # EBML header id
        header_size, _ = _read_vint(handle, keep_marker=False)
        handle.seek(header_size, os.SEEK_CUR)
        element, _ = _read_vint(handle, keep_marker=True)
        segment_size, _ = _read_vint(handle, keep_marker=False)
    except (EOFError, ValueError, TypeError):
        return None  # not framed as expected: let the demuxer judge
    if element != 0x18538067 or segment_size is None:  # no Segment, or one of unknown size (live streams)
        return None
    return handle.tell() + segment_size


def _last_box_end(handle, size: int) -> int | None:
    offset = 0
    while offset < size:
        handle.seek(offset)
        header = handle.read(16)
        if len(header) < 8:
            return offset + 8
        box_size = struct.unpack(">I", header[:4])[0]
        if box_size == 1:
            if len(header) < 16:
                return offset + 16
            box_size = struct.unpack(">Q", header[8:16])[0]
        elif box_size == 0:  # the last box runs to the end of the file
            return None
        if box_size < 8:
            return None  # not a box layout we know: let the demuxer judge
        offset += box_size
    return offset


# --------------------------------------------------------------------------- #
# decord
# --------------------------------------------------------------------------- #
class DecordSource(VideoSource):
    """decord's VideoReader, admitted only where the container proves that decord indexes the file right.

    decord (unmaintained since 2021, its own FFmpeg 4 inside) sorts frames by timestamp and seeks to the keyframe
    before each batch; measured on the test corpus it silently returns wrong frames for timestamps written in
    decoding order, open GOPs, streams that start without a keyframe, truncated AVI and MP4 files, and mp4 edit
    lists. So a file is first indexed with PyAV (demux only, no decoding) and refused unless its timestamps are
    trustworthy, its GOPs closed, nothing is hidden by an edit list, the container is intact, and decord's frame
    count and timestamps equal the index's. What no check can catch: payload damage that no decoder reports is
    concealed differently by decord's FFmpeg than by current FFmpeg. ``pyav`` is the default backend.
    """

    def __init__(self, path: str):
        import decord  # not importable on every platform; PyAV and frame folders work without it

        index = inspect_stream(path)
        refusal = ("its timestamps cannot be trusted: " + index.untrusted if index.untrusted
                   else "it has open GOPs" if index.open_gop
                   else f"it starts with {index.hidden} frames hidden by an mp4 edit list" if index.hidden else "")
        if refusal:
            raise VideoReadError(path, f"decord mis-indexes this file ({refusal}); read it with backend='pyav'")
        self._errors = (decord.DECORDError, RuntimeError)
        decord.logging.set_level(decord.logging.QUIET)  # its FFmpeg writes every concealed error to stderr
        try:
            self._reader = decord.VideoReader(path, num_threads=1)
            num_frames, fps = len(self._reader), float(self._reader.get_avg_fps())
        except self._errors as error:
            raise VideoReadError(path, f"cannot open ({_short(error)})") from None
        super().__init__(path, num_frames, fps)
        self._check_index(index)
        self._index = index

    def frame_times(self) -> np.ndarray:
        return _seconds_from_first(self._index)  # _check_index proved decord's timestamps equal these

    def _check_index(self, index: StreamIndex) -> None:
        """decord's frame list must be the container's, frame for frame (it has added a duplicate last frame)."""
        if self.num_frames != len(index.pts):
            raise VideoReadError(self.path, f"decord counts {self.num_frames} frames where the container holds "
                                            f"{len(index.pts)}; read it with backend='pyav'")
        starts = self._reader.get_frame_timestamp(list(range(self.num_frames)))[:, 0]
        expected = np.array([float(pts * index.time_base) for pts in index.pts])
        misplaced = ~np.isclose(starts, expected, rtol=0, atol=max(float(index.time_base) / 2, 1e-4))
        if misplaced.any():
            first = int(np.argmax(misplaced))
            raise VideoReadError(self.path, f"decord places frame {first} at {starts[first]:.4f} s, the container "
                                            f"at {expected[first]:.4f} s; read it with backend='pyav'")

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
    """A short, exact list of frame indices: runs of consecutive ones as a..b."""
    runs, start = [], indices[0]
    for previous, current in zip(indices, indices[1:] + [None]):
        if current != previous + 1:
            runs.append(f"{start}..{previous}" if previous > start else str(start))
            start = current
    return ", ".join(runs) if len(runs) <= 8 else ", ".join(runs[:8]) + f", ... ({len(indices)} frames)"


# --------------------------------------------------------------------------- #
# PyAV
# --------------------------------------------------------------------------- #
class _TimestampsDisagree(Exception):
    """The decoder's output contradicts the packet index: the file is read by counting decoded frames instead."""


class PyAVSource(VideoSource):
    """PyAV (FFmpeg): frame ``i`` is the ``i``-th frame FFmpeg's own sequential decode outputs.

    Where the container's timestamps can be trusted (``StreamIndex.seekable``), a read seeks to the keyframe
    before its first frame and decodes only the frames wanted or referenced; the frame count is the index's count
    of shown packets (exact for every container: webm/mkv headers carry none, frames hidden by an mp4 edit list
    are not shown). Every frame the decoder outputs is checked against the index (the keyframe first, then
    strictly increasing timestamps, each one indexed); a contradiction switches the file to counted decoding.
    Elsewhere (timestamps in decoding order, missing or repeated; a stream that starts without a keyframe) the
    frames are counted as FFmpeg decodes them from the start: at open, and again up to the last frame of each
    read — slower, never misplaced. A frame the decoder flags as damaged, or a decoding error, fails the read.
    """

    def __init__(self, path: str):
        self.path = path
        self._container = _open_container(path)
        try:
            # One container for the index and the reads: a seek brings it back from the end of the demux.
            self._index = _inspect_container(self._container, path)
            self._stream = self._container.streams.video[0]
            fps = _stream_fps(self._stream)
            num_frames = len(self._index.pts) if self._index.seekable else self._count_decoded()
            super().__init__(path, num_frames, fps)
        except BaseException:
            self._container.close()
            raise
        self._index_of_pts = {pts: index for index, pts in enumerate(self._index.pts)}
        # One converter for all frames: frame.to_ndarray() builds a new swscale context for every frame, which
        # costs more than the conversion itself (0.46 vs 0.13 ms per 256x320 frame, identical pixels).
        self._reformatter = VideoReformatter()

    @property
    def counted(self) -> bool:
        """True when frames are counted as decoded from the start rather than placed by their timestamps."""
        return not self._index.seekable

    def frame_times(self) -> np.ndarray:
        # Counted files (timestamps missing, repeated or in decoding order) can only be timed by their frame rate.
        return super().frame_times() if self.counted else _seconds_from_first(self._index)

    def _read_sorted(self, indices: list[int]) -> np.ndarray:
        try:
            return self._collect(indices, self._decode_sequentially() if self.counted else self._seek_and_decode(
                indices[0], set(indices)))
        except _TimestampsDisagree as disagreement:
            self._fall_back_to_counting(str(disagreement))
            return self._collect(indices, self._decode_sequentially())

    def _collect(self, indices: list[int], decoded) -> np.ndarray:
        wanted, last, found = set(indices), indices[-1], {}
        try:
            for index, frame in decoded:
                if frame.is_corrupt:  # concealed decoding errors: what follows in the GOP is damaged too
                    raise VideoReadError(self.path, f"frame {index} is damaged (the decoder reports errors)")
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

    def _seek_and_decode(self, first: int, wanted: set[int]):
        """(frame index, frame) from the keyframe at or before frame ``first`` on, checked against the index.

        Frames that are neither wanted nor referenced by other frames are not decoded at all: before each
        packet the decoder is told whether it may drop the packet's frame if it is a non-reference one
        (x264's default GOP makes about half of all frames such B-frames). Wanted and reference frames are
        decoded exactly as in a full decode, so the pixels are identical.
        """
        keyframes = self._index.keyframe_pts
        start = keyframes[max(bisect.bisect_right(keyframes, self._index.pts[first]) - 1, 0)]
        self._container.seek(start, stream=self._stream, backward=True)
        wanted_pts = {self._index.pts[index] for index in wanted}
        codec, previous = self._stream.codec_context, None
        try:
            for packet in self._container.demux(self._stream):
                codec.skip_frame = "DEFAULT" if packet.pts is None or packet.pts in wanted_pts else "NONREF"
                for frame in packet.decode():
                    if frame.pts is not None and frame.pts < start:
                        continue  # a leading frame of an open GOP, decoded without its reference: never wanted
                    index = self._index_of_pts.get(frame.pts)
                    # The keyframe comes out first (unless an edit list hides it), then timestamps only increase.
                    expected_first = previous is None and start in self._index_of_pts
                    if index is None or (expected_first and frame.pts != start) or (
                            previous is not None and frame.pts <= previous):
                        raise _TimestampsDisagree(f"after a seek to {start} the decoder output pts {frame.pts}")
                    previous = frame.pts
                    yield index, frame
        finally:
            codec.skip_frame = "DEFAULT"

    def _decode_sequentially(self):
        """(i, frame) for every frame FFmpeg outputs, from the first: the definition of frame i."""
        self._reopen()
        yield from enumerate(self._container.decode(self._stream))

    def _reopen(self) -> None:
        # The one way back to the first packet that works for every container: a seek to 0 may land on the first
        # keyframe, after the packets that a stream without a leading keyframe starts with.
        self._container.close()
        self._container = av.open(self.path)
        self._stream = _video_stream(self._container, self.path)

    def _count_decoded(self) -> int:
        self._reopen()
        count = 0
        try:
            for count, frame in enumerate(self._container.decode(self._stream), start=1):
                if frame.is_corrupt:
                    raise VideoReadError(self.path, f"frame {count - 1} is damaged (the decoder reports errors)")
        except av.FFmpegError as error:
            raise VideoReadError(self.path, f"undecodable after frame {count} ({_short(error)})") from None
        return count

    def _fall_back_to_counting(self, why: str) -> None:
        self._index.untrusted = why
        count = self._count_decoded()
        if count != self.num_frames:
            raise VideoReadError(self.path, f"the decoder outputs {count} frames where the container's index lists "
                                            f"{self.num_frames} ({why})")

    def close(self) -> None:
        self._container.close()


def _seconds_from_first(index: StreamIndex) -> np.ndarray:
    """Start times of the shown frames, in seconds from the first one (so a file whose timestamps start above 0,
    as transport streams' do, is timed from its first frame, as FFmpeg's ``-ss`` counts)."""
    ticks = np.array(index.pts, dtype=np.int64) - index.pts[0]
    return ticks * index.time_base.numerator / index.time_base.denominator  # float64: exact to ~1e-16 relative


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
