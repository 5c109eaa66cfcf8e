"""Writing real video files (H.264 in mp4 through PyAV): the synthetic dataset, tests and benchmarks use it."""

from __future__ import annotations

from collections.abc import Iterable

import av
import numpy as np

from datasets.files import atomic_path


def write_video(path: str, frames: Iterable[np.ndarray], fps: float = 30, *, crf: int = 23,
                gop: int | None = None, codec: str = "libx264") -> int:
    """Encode uint8 RGB frames (H, W, 3) — H and W even — to ``path``; returns the number of frames written.

    ``gop`` sets the keyframe interval (None keeps the encoder's default, 250 for x264, as in the wild).
    The file is written to a temporary name and renamed, so a killed writer never leaves a truncated video
    behind under the final name.
    """
    count = 0
    # The extension stays last because PyAV picks the container from it; the '.partial' in the name is what
    # datasets.annotations skips. Not synced: a generated dataset has thousands of videos and is made again
    # from its spec when it reads incomplete.
    with atomic_path(path, keep_suffix=True, fsync=False) as tmp, av.open(str(tmp), mode="w") as container:
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
    return count
