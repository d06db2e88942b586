"""How many of ferstream's events on the shared clips name the expression a viewer sees.

Usage:
    python benchmarks/stream_agreement.py [--config configs/pipeline.yaml] [--set section.field=value ...]
        [--labels benchmarks/labels/shared_clips.yaml] [--json OUT] [--failures PNG]

Each labelled clip (Intel IoT DevKit sample videos, CC BY 4.0; labels and their protocol in ``benchmarks/labels/``)
runs once through the single-process ``StreamPipeline`` of ``ferstream run``, every frame (``realtime: false``,
no fps limit, no loop), with the config's detector, classifier, tracker and emission policy; the events go to a
JSON-lines file. An event counts for a labelled span when its frame is in the span and its face box's centre is in
the span's ``x_range``; it **agrees** when its ``emotion`` is the span's expression. Events outside every span are
counted as unlabelled and not scored. The table gives, per clip and over all clips, the share of labelled events
that agree, and per labelled expression what the events said. Nothing is timed: the result does not depend on how
busy the machine is.

``--failures PNG`` also draws what disagreement looks like: per labelled person, up to four of the events that
disagree, evenly spaced over the clip, each the event's face (its box, a quarter wider) with what ferstream said
and what the viewer sees.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bench_common as common
import yaml
from pipeline_throughput import add_setting_argument, build_config, unpaced_source

from pipeline.events import EventPublisher, ExpressionEvent
from pipeline.metrics import PipelineMetrics
from pipeline.runner import ModelStages, StreamPipeline

DEFAULT_LABELS = common.REPO_ROOT / "benchmarks/labels/shared_clips.yaml"


@dataclass(frozen=True)
class Span:
    clip: str
    person: str
    x_range: tuple[float, float]
    frames: tuple[int, int]
    expression: str

    def covers(self, event: ExpressionEvent, width: int) -> bool:
        x1, _y1, x2, _y2 = event.box
        centre = (x1 + x2) / 2.0 / width
        return self.frames[0] <= event.frame_index <= self.frames[1] and self.x_range[0] <= centre <= self.x_range[1]


def load_spans(path: Path) -> list[Span]:
    data = yaml.safe_load(path.read_text())
    return [
        Span(
            clip=item["clip"],
            person=item["person"],
            x_range=(float(item["x_range"][0]), float(item["x_range"][1])),
            frames=(int(item["frames"][0]), int(item["frames"][1])),
            expression=item["expression"],
        )
        for item in data["spans"]
    ]


def score(events: list[ExpressionEvent], spans: list[Span], width: int) -> dict[str, Any]:
    """Agreement of one clip's events with its spans (an event in two spans counts for the first)."""
    said: dict[str, Counter[str]] = {}
    by_person: dict[str, Counter[str]] = {}
    unlabelled = 0
    for event in events:
        span = next((span for span in spans if span.covers(event, width)), None)
        if span is None:
            unlabelled += 1
            continue
        said.setdefault(span.expression, Counter())[event.emotion] += 1
        by_person.setdefault(f"{span.person} ({span.expression})", Counter())[event.emotion] += 1
    labelled = sum(sum(counts.values()) for counts in said.values())
    agree = sum(counts[expression] for expression, counts in said.items())
    return {
        "events": len(events),
        "labelled_events": labelled,
        "unlabelled_events": unlabelled,
        "agree": agree,
        "agreement": round(agree / labelled, 4) if labelled else None,
        "by_expression": {
            expression: {"events": sum(counts.values()), "agree": counts[expression], "said": dict(counts.most_common())}
            for expression, counts in sorted(said.items())
        },
        "by_person": {person: dict(counts.most_common()) for person, counts in by_person.items()},
    }


FAILURE_TILE = 160  # pixels, the side of one face in the failure picture
FAILURES_PER_PERSON = 4


def pick_failures(events: list[ExpressionEvent], spans: list[Span], width: int, per_span: int) -> list[tuple[Span, ExpressionEvent]]:
    """Per span, up to ``per_span`` of its events that disagree, evenly spaced in frame order."""
    picked = []
    for span in spans:
        wrong = sorted((e for e in events if span.covers(e, width) and e.emotion != span.expression), key=lambda e: e.frame_index)
        if not wrong:
            continue
        step = max(1, len(wrong) // per_span)
        picked += [(span, event) for event in wrong[::step][:per_span]]
    return picked


def failure_tile(image: Any, event: ExpressionEvent, expected: str) -> Any:
    """The event's face, a quarter wider than its box, with what was said and what the viewer sees."""
    import cv2
    import numpy as np

    x1, y1, x2, y2 = event.box
    pad_x, pad_y = (x2 - x1) // 8, (y2 - y1) // 8
    height, width = image.shape[:2]
    face = image[max(0, y1 - pad_y) : min(height, y2 + pad_y), max(0, x1 - pad_x) : min(width, x2 + pad_x)]
    tile = np.full((FAILURE_TILE + 44, FAILURE_TILE, 3), 255, np.uint8)
    tile[:FAILURE_TILE] = cv2.resize(face, (FAILURE_TILE, FAILURE_TILE), interpolation=cv2.INTER_AREA)
    font = cv2.FONT_HERSHEY_SIMPLEX
    cv2.putText(tile, f"said {event.emotion} {event.confidence:.2f}", (4, FAILURE_TILE + 17), font, 0.45, (0, 0, 200), 1, cv2.LINE_AA)
    cv2.putText(tile, f"viewer: {expected}", (4, FAILURE_TILE + 37), font, 0.45, (0, 120, 0), 1, cv2.LINE_AA)
    return tile


def write_failures(path: Path, rows: list[tuple[str, list[Any]]]) -> None:
    """One row of tiles per labelled person, titled, as a PNG."""
    import cv2
    import numpy as np

    columns = max(len(tiles) for _title, tiles in rows)
    tile_height, tile_width = rows[0][1][0].shape[:2]
    blocks = []
    for title, tiles in rows:
        strip = np.full((tile_height + 24, columns * (tile_width + 6), 3), 255, np.uint8)
        cv2.putText(strip, title, (4, 17), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
        for index, tile in enumerate(tiles):
            left = index * (tile_width + 6)
            strip[24:, left : left + tile_width] = tile
        blocks.append(strip)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), np.vstack(blocks), [cv2.IMWRITE_PNG_COMPRESSION, 9]):
        raise SystemExit(f"cannot write {path}")


def run_clip(config: Any, clip: Path, camera_id: str) -> list[ExpressionEvent]:
    """One pass of a clip through the real pipeline; the events it published."""
    metrics = PipelineMetrics()
    published: list[ExpressionEvent] = []
    pipeline = StreamPipeline(
        config,
        metrics,
        ModelStages.build(config),
        EventPublisher(config.events, metrics),
        on_events=lambda _camera, events: published.extend(events),
    )
    try:
        pipeline.add_camera(unpaced_source(camera_id, clip, loop=False))
        pipeline.run()
    finally:
        pipeline.close()
    return published


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=common.REPO_ROOT / "configs/pipeline.yaml")
    parser.add_argument("--labels", type=Path, default=DEFAULT_LABELS)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--failures", type=Path, default=None, help="PNG of disagreeing events' faces, per labelled person")
    add_setting_argument(parser)
    args = parser.parse_args()

    spans = load_spans(args.labels)
    clips = common.shared_clips()
    rows: dict[str, Any] = {}
    failure_rows: list[tuple[str, list[Any]]] = []
    with tempfile.TemporaryDirectory(prefix="ferstream-agreement-") as work:
        sink = ("events", "sink", {"kind": "jsonl", "path": str(Path(work) / "events.jsonl")})
        config = build_config(args.config, "redis://127.0.0.1:1/0", [sink, *args.settings])
        for clip_name in sorted({span.clip for span in spans}):
            info, images = common.decode_clip(clips[clip_name])
            events = run_clip(config, clips[clip_name], clip_name)
            clip_spans = [span for span in spans if span.clip == clip_name]
            rows[clip_name] = score(events, clip_spans, info.width)
            if args.failures:
                picked = pick_failures(events, clip_spans, info.width, FAILURES_PER_PERSON)
                for span in dict.fromkeys(span for span, _event in picked):
                    tiles = [failure_tile(images[e.frame_index], e, span.expression) for owner, e in picked if owner == span]
                    failure_rows.append((f"{clip_name[:24]}: {span.person}"[:72], tiles))
            print(f"{clip_name}: {rows[clip_name]['agree']}/{rows[clip_name]['labelled_events']} labelled events agree", flush=True)
            for person, said in rows[clip_name]["by_person"].items():
                print(f"  {person}: " + ", ".join(f"{name} {count}" for name, count in said.items()), flush=True)

    if args.failures and failure_rows:
        write_failures(args.failures, failure_rows)
        print(f"failures: {args.failures}", flush=True)
    total_labelled = sum(row["labelled_events"] for row in rows.values())
    total_agree = sum(row["agree"] for row in rows.values())
    print()
    print(
        common.markdown_table(
            ["clip", "events", "labelled", "agree", "share", "what the labelled events said"],
            [
                [
                    clip,
                    row["events"],
                    row["labelled_events"],
                    row["agree"],
                    f"{row['agreement']:.1%}" if row["agreement"] is not None else "-",
                    ", ".join(
                        f"{expression}: " + " ".join(f"{name} {count}" for name, count in item["said"].items())
                        for expression, item in row["by_expression"].items()
                    ),
                ]
                for clip, row in rows.items()
            ]
            + [["all", "", total_labelled, total_agree, f"{total_agree / total_labelled:.1%}" if total_labelled else "-", ""]],
        )
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "when": common.utc_now(),
                    "command": common.command_line(),
                    "git": common.git_description(),
                    "model": common.model_description(config.classifier.checkpoint),
                    "config": str(args.config),
                    "labels": str(args.labels),
                    "agreement": round(total_agree / total_labelled, 4) if total_labelled else None,
                    "clips": rows,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
