"""Synthetic H.264 clips for tests, encoded with the libx264 that ships inside PyAV's wheel.

Every frame carries its own index as a row of black/white blocks along the top edge (one
block per bit, most significant first), so a test can tell which frame it got back even
after lossy compression, reordering (B-frames) or dropping. The rest of the picture is a
moving gradient so that the encoder has real motion to predict (and B-frames to use).
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

MARKER_BITS = 8  # indices are encoded modulo 256
MARKER_BLOCK = 16  # pixels per bit block; big enough to survive heavy quantisation
MARKER_ROWS = 16


def _frame_image(index: int, width: int, height: int) -> np.ndarray:
    """An RGB frame: a gradient that slides with ``index`` plus the index marker on top."""
    xs = (np.arange(width, dtype=np.int32) + 4 * index) % 256
    ys = np.arange(height, dtype=np.int32)[:, None]
    image = np.empty((height, width, 3), dtype=np.uint8)
    image[..., 0] = xs[None, :].astype(np.uint8)
    image[..., 1] = ((ys * 2 + 3 * index) % 256).astype(np.uint8)
    image[..., 2] = 96
    image[:MARKER_ROWS, : MARKER_BITS * MARKER_BLOCK] = 0
    for bit in range(MARKER_BITS):
        if (index >> (MARKER_BITS - 1 - bit)) & 1:
            x0 = bit * MARKER_BLOCK
            image[:MARKER_ROWS, x0 : x0 + MARKER_BLOCK] = 255
    return image


def read_marker(image: np.ndarray) -> int:
    """The frame index (modulo 256) that ``encode_test_clip`` drew into a decoded BGR/RGB image."""
    value = 0
    for bit in range(MARKER_BITS):
        x0 = bit * MARKER_BLOCK
        # Sample the middle of the block: its edges bleed into neighbours after compression.
        block = image[4 : MARKER_ROWS - 4, x0 + 4 : x0 + MARKER_BLOCK - 4]
        value = (value << 1) | int(block.mean() > 127)
    return value


def encode_test_clip(
    path: Path | str,
    frames: int = 30,
    fps: int = 25,
    size: tuple[int, int] = (160, 96),
    bframes: int = 0,
    gop: int | None = None,
) -> Path:
    """Encode ``frames`` synthetic frames of ``size`` (width, height) at ``fps`` into ``path``.

    The container follows the suffix: ``.mp4``, ``.mkv``, ``.ts``, ``.h264`` (a raw Annex B
    stream) or ``.m3u8`` (an HLS playlist, its ``.ts`` segments written beside it). MP4 files
    get ``faststart`` (index at the front) like files meant for streaming, so that a truncated
    MP4 still opens. ``bframes > 0`` turns on B-frames, so decode order differs from
    presentation order. ``gop`` is the keyframe interval (default: one keyframe a second),
    which decides how much of a damaged clip can be recovered.
    """
    path = Path(path)
    width, height = size
    if width % 2 or height % 2:
        raise ValueError("width and height must be even for yuv420p")
    if width < MARKER_BITS * MARKER_BLOCK or height < MARKER_ROWS * 2:
        raise ValueError(f"size must be at least {MARKER_BITS * MARKER_BLOCK}x{MARKER_ROWS * 2} to hold the index marker")
    suffix = path.suffix.lower()
    container_options: dict[str, str] = {}
    if suffix in (".mp4", ".mov"):
        container_options = {"movflags": "+faststart"}
    elif suffix == ".m3u8":
        # A finished (VOD) HLS playlist with one segment per keyframe interval, next to ``path``.
        keyint_s = (gop if gop is not None else fps) / fps
        container_options = {"hls_time": f"{keyint_s:g}", "hls_list_size": "0", "hls_playlist_type": "vod"}
    with av.open(str(path), mode="w", options=container_options) as container:
        stream = container.add_stream("libx264", rate=Fraction(fps, 1))
        stream.width = width
        stream.height = height
        stream.pix_fmt = "yuv420p"
        keyint = gop if gop is not None else fps
        # ultrafast (fast tests) disables B-frames, so ask for them explicitly via x264-params.
        stream.codec_context.options = {
            "preset": "ultrafast" if bframes == 0 else "veryfast",
            "x264-params": f"bframes={bframes}:keyint={keyint}:min-keyint={keyint}:scenecut=0",
        }
        for index in range(frames):
            frame = av.VideoFrame.from_ndarray(_frame_image(index, width, height), format="rgb24")
            frame.pts = index
            frame.time_base = Fraction(1, fps)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def decode_bgr_frames(path: Path) -> list[np.ndarray]:
    """Every frame of a video file, as BGR arrays."""
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="bgr24") for frame in container.decode(video=0)]
