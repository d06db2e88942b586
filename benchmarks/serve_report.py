"""The Markdown report of ``serve_cameras.py``: one row per camera level, the detector-alone reference, CPU per process."""

from __future__ import annotations

import statistics
from typing import Any

import bench_common as common

__all__ = ["detector_reference", "report_markdown"]


def detector_reference(result: dict[str, Any], threads: int, batch_size: int) -> float | None:
    values = [
        row["frames_per_s"]
        for phase in ("before", "after")
        for row in result["detector_alone"].get(phase, [])
        if row["threads"] == threads and row["batch_size"] == batch_size
    ]
    return statistics.fmean(values) if values else None


def _idle_cpu(*rows: dict[str, Any] | None) -> str:
    """The Serve app's and other processes' CPU (% of a core) during detector-alone measurements."""
    cells = []
    for row in rows:
        if row is None or "serve_app_cpu_percent" not in row:
            cells.append("")
            continue
        others = sum(item["cpu_percent"] for item in row["other_processes_cpu"])
        cells.append(f"{row['serve_app_cpu_percent']:.0f} / {others:.0f}")
    return "; ".join(cells)


def report_markdown(result: dict[str, Any]) -> str:
    settings = result["settings"]
    batch = settings["detector_max_batch_size"]
    replica_threads, all_threads = settings["replica_torch_threads"], settings["all_threads"]
    ref_replica = detector_reference(result, replica_threads, batch)
    ref_all = detector_reference(result, all_threads, batch)
    header = [
        "cameras",
        "processed fps / camera (mean)",
        "processed fps total",
        "decoded fps total",
        "dropped / s (stale, fps_limit)",
        "dropped %",
        "latency p50 ms",
        "latency p99 ms",
        "events / s",
        "detector batches of 1 / 2 / 3-4",
        f"ratio to detector alone ({all_threads} thr, bs {batch})",
        f"ratio to detector alone ({replica_threads} thr, bs {batch})",
    ]
    rows = []
    for level in result["levels"]:
        reasons = level["dropped_by_reason_ray_metrics"]
        rows.append(
            [
                level["cameras"],
                f"{level['processed_fps_per_camera_mean']:.2f}",
                f"{level['processed_fps_total']:.2f}",
                f"{level['decoded_fps_total']:.1f}",
                f"{level['dropped_per_s_total']:.1f} ({reasons['stale']}, {reasons['fps_limit']})",
                f"{100 * level['frames_dropped'] / level['frames_decoded']:.0f} %" if level["frames_decoded"] else "",
                level["latency_ms"]["p50"],
                level["latency_ms"]["p99"],
                f"{level['events_per_s']:.1f}",
                " / ".join(
                    f"{100 * share:.0f} %" for key, share in level["replica_metrics"]["detect_batch_size_shares"].items() if key != "5+"
                )
                if level["replica_metrics"]["detect_batch_size_shares"]
                else "",
                f"{level['processed_fps_total'] / ref_all:.2f}" if ref_all else "",
                f"{level['processed_fps_total'] / ref_replica:.2f}" if ref_replica else "",
            ]
        )
    parts = [common.markdown_table(header, rows)]
    parts.append(
        "dropped / s from the stream statuses; the (stale, fps_limit) counts are the window's drops by reason from "
        "Ray's metrics port (exported with a lag, so approximate); detector batch sizes are the shares of the FaceDetector "
        "replica's batches over the window, from the batch_size histogram's bucket counts (Ray's metrics port)."
    )

    detector_rows = []
    before = {(row["threads"], row["batch_size"]): row for row in result["detector_alone"].get("before", [])}
    after = {(row["threads"], row["batch_size"]): row for row in result["detector_alone"].get("after", [])}
    for key in before.keys() | after.keys():
        b, a = before.get(key), after.get(key)
        detector_rows.append(
            [
                key[0],
                key[1],
                f"{b['frames_per_s']:.2f}" if b else "",
                f"{a['frames_per_s']:.2f}" if a else "",
                f"{b['ms_per_batch']:.0f}" if b else "",
                _idle_cpu(b, a),
            ]
        )
    detector_rows.sort()
    parts.append(
        "Detector alone (the configured detector's `detect_batch` in the benchmark process, Serve app idle, "
        f"detection_size {settings['detection_size']}):\n\n"
        + common.markdown_table(
            [
                "torch threads",
                "batch size",
                "frames/s before",
                "frames/s after",
                "ms/batch before",
                "idle app / other CPU % (before; after)",
            ],
            detector_rows,
        )
    )

    cpu_header = ["process", *[f"{level['cameras']} cam" for level in result["levels"]]]
    roles: list[str] = []
    for level in result["levels"]:
        for row in level["cpu_percent_by_process"]:
            if row["process"] not in roles:
                roles.append(row["process"])
    cpu_rows = []
    for role in roles:
        cells = []
        for level in result["levels"]:
            value = next((row["cpu_percent"] for row in level["cpu_percent_by_process"] if row["process"] == role), None)
            cells.append(f"{value:.0f}" if value is not None else "")
        cpu_rows.append([role, *cells])
    parts.append("CPU over each window, % of one core (from /proc; ≥ 0.5 % shown):\n\n" + common.markdown_table(cpu_header, cpu_rows))
    return "\n\n".join(parts)
