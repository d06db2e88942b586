"""What ``detector.interval`` costs in faces: carried boxes against the detector's own boxes on the same frames.

Usage:
    python benchmarks/detection_interval.py [--intervals 1 2 3 5] [--scales 1 0.5] [--config configs/pipeline.yaml] [--json OUT]

For every shared clip (Intel IoT DevKit sample videos, CC BY 4.0), every frame goes through the configured detector
once; those boxes are the reference. Then, for each interval N, the clip is replayed the way ``CameraAnalyzer`` does
it: every Nth frame takes the reference boxes, the frames in between take ``IoUTracker.carried_detections()`` (each
track's last box moved on at its velocity), and both go through ``IoUTracker.update`` as in the service. On each
frame the faces the tracker reports are matched to the reference boxes (IoU >= ``--match-iou``, one to one):

- **recall**: matched reference faces / all reference faces (1.0 for interval 1 by construction);
- **precision**: matched reported faces / all reported faces (a carried box that drifted off its face, or a face
  kept after it left, counts against it);
- **mean IoU** of the matched pairs, and **detector calls** per frame.

Scale < 1 shrinks each frame into the top-left of a black frame of the original size (as in small_faces.py), so faces
are smaller and move fewer pixels per frame. No timing is measured here (the speed side of the trade is the detector
time per frame in benchmarks/pipeline_throughput.py), so the result does not depend on how busy the machine is.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import bench_common as common
import numpy as np
from small_faces import shrink_into_frame

from pipeline.config import load_config
from pipeline.detection import FaceDetection, build_detector, detect_frames
from pipeline.tracking import IoUTracker, iou


def match_count(reported: list[FaceDetection], reference: list[FaceDetection], threshold: float) -> tuple[int, list[float]]:
    """Greedy one-to-one matching by IoU, best pairs first: the number of pairs and their IoUs."""
    pairs = sorted(
        ((iou(a.box, b.box), i, j) for i, a in enumerate(reported) for j, b in enumerate(reference)),
        reverse=True,
    )
    used_reported, used_reference, overlaps = set(), set(), []
    for overlap, i, j in pairs:
        if overlap < threshold:
            break
        if i in used_reported or j in used_reference:
            continue
        used_reported.add(i)
        used_reference.add(j)
        overlaps.append(overlap)
    return len(overlaps), overlaps


def replay(reference: list[list[FaceDetection]], interval: int, tracker: IoUTracker, classes: int, match_iou: float) -> dict[str, Any]:
    reported_total = matched = reference_total = 0
    overlaps: list[float] = []
    for index, faces in enumerate(reference):
        due = index % interval == 0
        detections = faces if due else tracker.carried_detections()
        uniform = np.full((len(detections), classes), 1.0 / classes, dtype=np.float32)
        update = tracker.update(detections, uniform, carried=not due)
        reported = [face.detection for face in update.faces]
        pairs, ious = match_count(reported, faces, match_iou)
        reported_total += len(reported)
        reference_total += len(faces)
        matched += pairs
        overlaps.extend(ious)
    return {
        "interval": interval,
        "frames": len(reference),
        "reference_faces": reference_total,
        "reported_faces": reported_total,
        "matched": matched,
        "recall": round(matched / reference_total, 4) if reference_total else None,
        "precision": round(matched / reported_total, 4) if reported_total else None,
        "mean_iou": round(float(np.mean(overlaps)), 4) if overlaps else None,
        "detector_calls_per_frame": round(len(range(0, len(reference), interval)) / len(reference), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--intervals", type=int, nargs="+", default=[1, 2, 3, 5])
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 0.5])
    parser.add_argument("--config", type=Path, default=common.REPO_ROOT / "configs/pipeline.yaml", help="detector and tracker settings")
    parser.add_argument("--match-iou", type=float, default=0.5, help="IoU at which a reported face matches a reference face")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    config = load_config(args.config)
    detector = build_detector(config.detector)
    rows: list[dict[str, Any]] = []
    for clip_name, path in common.shared_clips().items():
        _info, images = common.decode_clip(path)
        for scale in args.scales:
            frames = [shrink_into_frame(image, scale) for image in images]
            reference = [
                found
                for start in range(0, len(frames), 8)
                for found in detect_frames(detector, frames[start : start + 8], config.detector.detection_size)
            ]
            for interval in args.intervals:
                row = {
                    "clip": clip_name,
                    "scale": round(scale, 3),
                    **replay(reference, interval, IoUTracker(config.tracker), 7, args.match_iou),
                }
                rows.append(row)
                print(
                    f"{clip_name} scale {scale:.3f} interval {interval}: recall {row['recall']}, precision {row['precision']}, "
                    f"mean IoU {row['mean_iou']}",
                    flush=True,
                )
    print()
    print(
        common.markdown_table(
            ["clip", "scale", "interval", "detector calls/frame", "reference faces", "reported", "recall", "precision", "mean IoU"],
            [
                [
                    r["clip"],
                    r["scale"],
                    r["interval"],
                    r["detector_calls_per_frame"],
                    r["reference_faces"],
                    r["reported_faces"],
                    r["recall"],
                    r["precision"],
                    r["mean_iou"],
                ]
                for r in rows
            ],
        )
    )
    if args.json:
        common.write_result(args.json, config=str(args.config), match_iou=args.match_iou, rows=rows)


if __name__ == "__main__":
    main()
