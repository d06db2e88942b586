"""How many of ferstream's events on the shared clips name the expression a viewer sees.

Usage:
    python benchmarks/stream_agreement.py [--config configs/pipeline.yaml] [--set section.field=value ...]
        [--labels benchmarks/labels/shared_clips.yaml] [--json OUT]

Each labelled clip (Intel IoT DevKit sample videos, CC BY 4.0; labels and their protocol in ``benchmarks/labels/``)
runs once through the single-process ``StreamPipeline`` of ``ferstream run``, every frame (``realtime: false``,
no fps limit, no loop), with the config's detector, classifier, tracker and emission policy; the events go to a
JSON-lines file. An event counts for a labelled span when its frame is in the span and its face box's centre is in
the span's ``x_range``; it **agrees** when its ``emotion`` is the span's expression. Events outside every span are
counted as unlabelled and not scored. The table gives, per clip and over all clips, the share of labelled events
that agree, and per labelled expression what the events said. Nothing is timed: the result does not depend on how
busy the machine is.
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
    add_setting_argument(parser)
    args = parser.parse_args()

    spans = load_spans(args.labels)
    clips = common.shared_clips()
    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="ferstream-agreement-") as work:
        sink = ("events", "sink", {"kind": "jsonl", "path": str(Path(work) / "events.jsonl")})
        config = build_config(args.config, "redis://127.0.0.1:1/0", [sink, *args.settings])
        for clip_name in sorted({span.clip for span in spans}):
            info, _images = common.decode_clip(clips[clip_name])
            events = run_clip(config, clips[clip_name], clip_name)
            rows[clip_name] = score(events, [span for span in spans if span.clip == clip_name], info.width)
            print(f"{clip_name}: {rows[clip_name]['agree']}/{rows[clip_name]['labelled_events']} labelled events agree", flush=True)
            for person, said in rows[clip_name]["by_person"].items():
                print(f"  {person}: " + ", ".join(f"{name} {count}" for name, count in said.items()), flush=True)

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
