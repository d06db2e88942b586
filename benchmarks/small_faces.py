"""Small faces: how many faces each detector finds when the shared clips' people are far away.

Usage:
    python benchmarks/small_faces.py [--resolution native 1080p] [--scales 1 0.5 0.333] [--frames 40] [--json OUT]

Each shared clip is scaled to 1/2 and 1/3 and pasted into the top-left corner of a black frame of
the clip's original size (so the detector sees the same frame size with smaller faces), then run
through every detector at the service's ``detection_size``. Scale 1 is the clip as it is. The
reference is what each detector finds at scale 1; MTCNN's count at each scale is the bar the
default detector must reach. ``--resolution 1080p`` first re-encodes each clip upscaled to 1920x1080
with PyAV (as ``fer_peer.py`` does), so the same faces arrive in a 1080p camera's frame and the
detector's ``detection_size`` downscale. The clips are Intel IoT DevKit sample videos (CC BY 4.0).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import bench_common as common
import cv2
import numpy as np

from pipeline.config import BlazeFaceConfig, MTCNNConfig
from pipeline.detection import FaceDetector, build_detector, detect_frames

DETECTORS: dict[str, MTCNNConfig | BlazeFaceConfig] = {
    "mtcnn": MTCNNConfig(),
    "blazeface full_range, whole frame": BlazeFaceConfig(model="full_range", tiles=(1, 1)),
    "blazeface back, whole frame": BlazeFaceConfig(model="back", tiles=(1, 1)),
    "blazeface full_range + 2x1 full_range tiles": BlazeFaceConfig(model="full_range", tiles=(2, 1)),
    "blazeface back + 2x1 full_range tiles (default)": BlazeFaceConfig(),
}


def shrink_into_frame(image: np.ndarray, scale: float) -> np.ndarray:
    """The image scaled by ``scale`` in the top-left corner of a black frame of its own size."""
    if scale == 1.0:
        return image
    height, width = image.shape[:2]
    small = cv2.resize(image, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_AREA)
    frame = np.zeros_like(image)
    frame[: small.shape[0], : small.shape[1]] = small
    return frame


def count_faces(detector: FaceDetector, frames: list[np.ndarray], detection_size: int) -> tuple[int, float]:
    started = time.perf_counter()
    found = sum(len(faces) for faces in detect_frames(detector, frames, detection_size))
    return found, (time.perf_counter() - started) / len(frames) * 1e3


def measure_clip(
    detectors: dict[str, FaceDetector], clip: str, images: list[np.ndarray], scales: list[float], detection_size: int
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for scale in scales:
        frames = [shrink_into_frame(image, scale) for image in images]
        for name, detector in detectors.items():
            detect_frames(detector, frames[:1], detection_size)  # warm-up
            faces, ms = count_faces(detector, frames, detection_size)
            rows.append(
                {
                    "clip": clip,
                    "scale": round(scale, 3),
                    "detector": name,
                    "frames": len(frames),
                    "faces": faces,
                    "ms_per_frame": round(ms, 2),
                }
            )
            print(f"{clip} scale {scale:.3f} {name}: {faces} faces in {len(frames)} frames, {ms:.1f} ms/frame", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", nargs="+", choices=sorted(common.RESOLUTIONS), default=["native"], help="clip sets, in order")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 0.5, 1 / 3])
    parser.add_argument("--frames", type=int, default=40, help="frames per clip (from the start)")
    parser.add_argument("--detection-size", type=int, default=640)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    detectors = {name: build_detector(config) for name, config in DETECTORS.items()}
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ferstream-small-faces-") as work:
        for resolution in args.resolution:
            for clip_name, source in common.shared_clips().items():
                size = common.RESOLUTIONS[resolution]
                path = (
                    source
                    if size is None
                    else common.reencode_clip(source, Path(work) / f"{clip_name}-{resolution}.mp4", size, args.frames)
                )
                _info, images = common.decode_clip(path)
                rows += measure_clip(detectors, f"{clip_name} {resolution}", images[: args.frames], args.scales, args.detection_size)

    print()
    print(
        common.markdown_table(
            ["clip", "scale", "detector", "faces", "ms/frame"],
            [[r["clip"], r["scale"], r["detector"], f"{r['faces']}/{r['frames']} frames", r["ms_per_frame"]] for r in rows],
        )
    )
    if args.json:
        common.write_result(args.json, rows=rows)


if __name__ == "__main__":
    main()
