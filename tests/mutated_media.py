"""Damaged and unusual video files for the fault-injection tests, made with PyAV at test time.

``bit_flips`` and ``truncations`` mutate the bytes of a good clip with a seeded RNG, so a failing
variant can be rebuilt from its seed and index. ``encode_clip`` writes clips in the formats a camera
may send but the pipeline's usual clips never have: odd sizes, 4K, grayscale, 4:4:4 and 10-bit.
``audio_only`` is a file with no video stream at all.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np


def _image(index: int, width: int, height: int) -> np.ndarray:
    # A gradient that moves with the frame index, so that the encoder has motion to predict.
    xs = (np.arange(width, dtype=np.int32) + 5 * index) % 256
    ys = (np.arange(height, dtype=np.int32) * 3 + index) % 256
    image = np.empty((height, width, 3), np.uint8)
    image[..., 0] = xs[None, :]
    image[..., 1] = ys[:, None]
    image[..., 2] = 96
    return image


def encode_clip(
    path: Path, size: tuple[int, int], pix_fmt: str = "yuv420p", codec: str = "libx264", frames: int = 5, fps: int = 25
) -> Path:
    """``frames`` frames of ``size`` (width, height) in ``pix_fmt``. libx264 needs even sizes; FFV1
    (lossless) takes any size, 1x1 included, and grayscale that stays grayscale when decoded."""
    width, height = size
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps, 1))
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if codec == "libx264":
            stream.codec_context.options = {"preset": "ultrafast", "x264-params": f"keyint={fps}:min-keyint={fps}:scenecut=0"}
        for index in range(frames):
            frame = av.VideoFrame.from_ndarray(_image(index, width, height), format="rgb24").reformat(format=pix_fmt)
            frame.pts, frame.time_base = index, Fraction(1, fps)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def audio_only(path: Path, seconds: float = 0.5, rate: int = 48_000) -> Path:
    """An AAC file with no video stream."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("aac", rate=rate)
        samples = np.sin(np.linspace(0, 440 * 2 * np.pi * seconds, int(rate * seconds), dtype=np.float32))[None, :]
        for start in range(0, samples.shape[1], 1024):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples[:, start : start + 1024]), format="fltp", layout="mono")
            frame.sample_rate = rate
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def bit_flips(data: bytes, rng: np.random.Generator, max_flips: int = 32) -> bytes:
    """``data`` with 1 to ``max_flips`` random bits inverted; half the variants hit the first 512 bytes,
    where the container header is, because damage there is what fails an open."""
    mutated = bytearray(data)
    flips = int(rng.integers(1, max_flips + 1))
    span = min(len(data), 512) if rng.random() < 0.5 else len(data)
    for position in rng.integers(0, span, size=flips):
        mutated[int(position)] ^= 1 << int(rng.integers(0, 8))
    return bytes(mutated)


def truncation(data: bytes, rng: np.random.Generator) -> bytes:
    """``data`` cut at a random length (0 included: a zero-length file)."""
    return data[: int(rng.integers(0, len(data)))]


def empty_sample_table(mp4: bytes) -> bytes:
    """An MP4 whose sample-size table (``stsz``) says it holds no samples: the video stream is there, with no frame.
    FFmpeg reads such a file as empty, so it opens and ends at once without an error."""
    data = bytearray(mp4)
    box = data.index(b"stsz")
    # After the box type: version and flags (4 bytes), the common sample size (4), then the sample count (4).
    data[box + 12 : box + 16] = bytes(4)
    return bytes(data)
