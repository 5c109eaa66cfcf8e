"""Writing real video files (H.264 in mp4 through PyAV): the synthetic dataset, tests and benchmarks use it."""

from __future__ import annotations

import os
from collections.abc import Iterable

import av
import numpy as np


def write_video(path: str, frames: Iterable[np.ndarray], fps: float = 30, *, crf: int = 23,
                gop: int | None = None, codec: str = "libx264") -> int:
    """Encode uint8 RGB frames (H, W, 3) — H and W even — to ``path``; returns the number of frames written.

    ``gop`` sets the keyframe interval (None keeps the encoder's default, 250 for x264, as in the wild).
    The file is written to a temporary name and renamed, so a killed writer never leaves a truncated video
    behind under the final name.
    """
    tmp = f"{path}.partial{os.path.splitext(path)[1]}"
    count = 0
    with av.open(tmp, mode="w") as container:
        stream = None
        for frame in frames:
            if stream is None:
                height, width = frame.shape[:2]
                stream = container.add_stream(codec, rate=round(fps))
                stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
                stream.options = {"crf": str(crf)}
                stream.codec_context.thread_count = 1
                if gop is not None:
                    stream.codec_context.gop_size = gop
            video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            container.mux(stream.encode(video_frame))
            count += 1
        if stream is None:
            raise ValueError(f"no frames to write to {path}")
        container.mux(stream.encode())  # flush the encoder's delayed frames
    os.replace(tmp, path)
    return count
