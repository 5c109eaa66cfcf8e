"""A corpus of video files built to break decoders, and the ground truth to judge them by.

Every file is written here with PyAV's encoders and muxers (FFmpeg), then often remuxed or damaged the way
real-world files are: B-frames whose container timestamps are in decoding order, open GOPs, variable frame
rate, AVI with MJPEG / MPEG-4 Part 2 / MS-MPEG4 / H.264, Matroska, WebM (VP9), QuickTime, MP4 trimmed by an edit
list, streams whose first packets are not keyframes, files cut at many byte offsets and files with damaged
packets in the middle.

The ground truth of a file is FFmpeg's own sequential decode of it (``reference_frames``): every frame the
decoder outputs, in its output (display) order, with no seeking and no index — what ``ffmpeg -i f -f framemd5``
lists with passthrough timing. A backend is correct on a file when, for any index set, it returns exactly those
frames, or raises ``VideoReadError``.
"""

from __future__ import annotations

import os
from fractions import Fraction

import av
import numpy as np

HEIGHT, WIDTH, NUM_FRAMES, FPS = 48, 64, 48, 25


def frames(count: int = NUM_FRAMES) -> list[np.ndarray]:
    """Frames that differ a lot from one another (a moving white square, colour ramps), so that a decoded frame
    is nearest to its own source frame even after lossy coding."""
    rows, cols = np.mgrid[0:HEIGHT, 0:WIDTH]
    out = []
    for index in range(count):
        frame = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
        frame[..., 0] = (cols * 4 + index * 9) % 256
        frame[..., 1] = (rows * 5 + index * 3) % 256
        frame[..., 2] = (index * 6) % 256
        top, left = (index * 7) % (HEIGHT - 12), (index * 11) % (WIDTH - 12)
        frame[top:top + 12, left:left + 12] = 255
        out.append(frame)
    return out


def encode(path: str, codec: str, *, container_format: str | None = None, rate: int = FPS,
           options: dict | None = None, max_b_frames: int | None = None, gop: int | None = None,
           pix_fmt: str = "yuv420p", pts: list[int] | None = None, time_base: Fraction | None = None) -> str:
    """Encode ``frames()`` with ``codec`` into ``path``; ``pts`` (in ``time_base``) gives irregular timing."""
    with av.open(path, "w", format=container_format) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, pix_fmt
        stream.codec_context.thread_count = 1
        if options:
            stream.options = options
        if max_b_frames is not None:
            stream.codec_context.max_b_frames = max_b_frames
        if gop is not None:
            stream.codec_context.gop_size = gop
        if time_base is not None:
            stream.codec_context.time_base = time_base
        for index, image in enumerate(frames()):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            if pts is not None:
                frame.pts, frame.time_base = pts[index], time_base
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def _packets(path: str) -> tuple[list, object]:
    with av.open(path) as container:
        stream = container.streams.video[0]
        return [packet for packet in container.demux(stream) if packet.size], stream.time_base


def remux(source: str, target: str, *, edit=None, container_format: str | None = None) -> str:
    """Stream-copy ``source`` to ``target``; ``edit(packets) -> packets`` rewrites them on the way."""
    packets, time_base = _packets(source)
    if edit is not None:
        packets = edit(packets)
    with av.open(source) as reader, av.open(target, "w", format=container_format) as writer:
        out = writer.add_stream_from_template(reader.streams.video[0])
        for packet in packets:
            packet.time_base = time_base
            packet.stream = out
            writer.mux(packet)
    return target


def timestamps_in_decoding_order(packets: list) -> list:
    """What some muxers write for B-frame streams: every pts equal to its dts (no composition offsets)."""
    first = packets[0].dts
    for packet in packets:
        packet.pts = packet.dts = packet.dts - first
    return packets


def without_leading_keyframe(packets: list) -> list:
    """Cut at a random access point but drop the keyframe itself: the stream starts with frames that refer to
    a picture it does not hold, as when a transport stream is recorded from the middle of a GOP."""
    keyframes = [position for position, packet in enumerate(packets) if packet.is_keyframe]
    return packets[keyframes[1] + 1:]


def trimmed_by_edit_list(packets: list, hidden: int = 2) -> list:
    """From the second keyframe on, timestamps shifted so that the first ``hidden`` frames fall before 0: the
    mp4 muxer writes an edit list hiding them, as ``ffmpeg -ss T -c copy`` does when T is not a keyframe."""
    keyframe_at = [position for position, packet in enumerate(packets) if packet.is_keyframe][1]
    kept = packets[keyframe_at:]
    shift = sorted(packet.pts for packet in kept)[hidden]
    for packet in kept:
        packet.pts, packet.dts = packet.pts - shift, packet.dts - shift
    return kept


def irregular_pts(count: int = NUM_FRAMES, seed: int = 0) -> list[int]:
    """Variable frame rate: gaps of 1, 2 or 3 ticks of 1/FPS, as a phone camera drops frames in low light."""
    gaps = np.random.default_rng(seed).choice([1, 1, 1, 2, 3], size=count)
    gaps[0] = 0
    return np.cumsum(gaps).tolist()


X264 = {"crf": "23", "preset": "veryfast"}


def build(folder: str) -> dict[str, str]:
    """Write the intact files of the corpus into ``folder``; returns {name: path}."""
    os.makedirs(folder, exist_ok=True)
    p = lambda name: os.path.join(folder, name)  # noqa: E731
    files = {}
    files["mp4_h264_bframes"] = encode(p("h264_bframes.mp4"), "libx264", options={**X264, "bf": "3"}, gop=12)
    files["mp4_h264_default_gop"] = encode(p("h264_default_gop.mp4"), "libx264", options=X264)
    files["mp4_h264_open_gop"] = encode(p("h264_open_gop.mp4"), "libx264",
                                        options={**X264, "x264-params": "open-gop=1:keyint=12:bframes=3"})
    files["mp4_h264_dts_order"] = remux(files["mp4_h264_bframes"], p("h264_dts_order.mp4"),
                                        edit=timestamps_in_decoding_order)
    files["mp4_h264_vfr"] = encode(p("h264_vfr.mp4"), "libx264", options={**X264, "bf": "2"}, gop=12,
                                   pts=irregular_pts(), time_base=Fraction(1, FPS))
    files["mp4_edit_list"] = remux(files["mp4_h264_bframes"], p("h264_edit_list.mp4"), edit=trimmed_by_edit_list)
    files["mp4_no_leading_keyframe"] = remux(files["mp4_h264_bframes"], p("h264_no_leading_keyframe.mp4"),
                                             edit=without_leading_keyframe)
    files["ts_no_leading_keyframe"] = remux(files["mp4_h264_bframes"], p("h264_no_leading_keyframe.ts"),
                                            edit=without_leading_keyframe, container_format="mpegts")
    files["mov_h264"] = remux(files["mp4_h264_bframes"], p("h264.mov"))
    files["mkv_h264"] = remux(files["mp4_h264_bframes"], p("h264.mkv"))
    files["webm_vp9"] = encode(p("vp9.webm"), "libvpx-vp9", options={"crf": "30", "b": "0", "deadline": "realtime",
                                                                       "cpu-used": "8", "lag-in-frames": "16",
                                                                       "auto-alt-ref": "1"}, gop=16)
    files["avi_mjpeg"] = encode(p("mjpeg.avi"), "mjpeg", pix_fmt="yuvj420p")
    files["avi_mpeg4"] = encode(p("mpeg4.avi"), "mpeg4", max_b_frames=2, gop=12, options={"qscale": "4"})
    files["avi_mpeg4_no_bframes"] = encode(p("mpeg4_no_b.avi"), "mpeg4", gop=12)
    files["avi_msmpeg4"] = encode(p("msmpeg4.avi"), "msmpeg4", gop=12)
    files["avi_h264"] = encode(p("h264.avi"), "libx264", options={**X264, "bf": "3"}, gop=12)
    files["avi_vfr"] = encode(p("mjpeg_vfr.avi"), "mjpeg", pix_fmt="yuvj420p", pts=irregular_pts(),
                              time_base=Fraction(1, FPS))
    files["avi_mpeg4_vfr"] = encode(p("mpeg4_vfr.avi"), "mpeg4", gop=12, pts=irregular_pts(seed=1),
                                    time_base=Fraction(1, FPS))
    return files


def cut(source: str, target: str, size: int) -> str:
    with open(source, "rb") as handle:
        data = handle.read(size)
    with open(target, "wb") as handle:
        handle.write(data)
    return target


def cut_offsets(size: int, count: int = 6) -> list[int]:
    """Byte offsets spread over a file, from just past its start to just before its end."""
    return sorted({int(size * share) for share in np.linspace(0.15, 0.97, count)} | {size - 7})


def damaged(source: str, target: str, *, share: float = 0.5, length: int = 64, seed: int = 0) -> str:
    """``length`` random bytes written over the payload of the packet at ``share`` of the stream (sizes and
    headers intact), as a bad sector or a broken transfer leaves a file."""
    with av.open(source) as container:
        stream = container.streams.video[0]
        packets = [(packet.pos, packet.size) for packet in container.demux(stream) if packet.size and packet.pos]
    position, size = packets[int(len(packets) * share)]
    with open(source, "rb") as handle:
        data = bytearray(handle.read())
    start = position + size // 3
    data[start:start + min(length, size // 2)] = np.random.default_rng(seed).bytes(min(length, size // 2))
    with open(target, "wb") as handle:
        handle.write(bytes(data))
    return target


def reference_frames(path: str) -> np.ndarray | None:
    """FFmpeg's sequential decode: every output frame in order, RGB; None when it yields no frame at all.

    Decoding errors that FFmpeg reports by raising end the decode there: what came before is the truth.
    """
    decoded = []
    try:
        with av.open(path) as container:
            for frame in container.decode(video=0):
                decoded.append(frame.to_ndarray(format="rgb24"))
    except (av.FFmpegError, OSError, IndexError):
        pass
    return np.stack(decoded) if decoded else None
