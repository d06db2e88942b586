"""The ``ferstream`` command: run the pipeline, tail events, train, evaluate, export and calibrate models."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from pipeline.config import (
    REDIS_PASSWORD_ENV,
    REDIS_URL_ENV,
    ConfigError,
    PipelineConfig,
    environment_overrides,
    load_config,
    merge_sections,
)
from pipeline.redis_check import RedisUnreachable, check_redis, redis_address, unreachable
from pipeline.summary import RunTotals

if TYPE_CHECKING:
    from pipeline.frames import SourceStatus
    from pipeline.metrics import PipelineMetrics

log = logging.getLogger("ferstream.cli")

# Seconds between per-track summary lines when events are being watched (run --print-events, tail).
DEFAULT_SUMMARY_S = 5.0


def run_config(args: argparse.Namespace, environ: dict[str, str] | None = None) -> PipelineConfig:
    """The config file with the environment's Redis settings and then the command line's on top
    (a flag given beats the ambient variable), validated once; errors name what was overridden."""
    environ = dict(os.environ) if environ is None else environ
    given = [name for name in (REDIS_URL_ENV, REDIS_PASSWORD_ENV) if environ.get(name)]
    command_line: dict[str, Any] = {}
    if args.source:
        command_line["cameras"] = [{"camera_id": args.camera_id, "url": args.source, "loop": args.loop}]
        given.append("--source")
    if args.redis_url:
        command_line["events"] = {"redis_url": args.redis_url}
        given.append("--redis-url")
    overrides = merge_sections(environment_overrides(environ), command_line)
    origin = f"{args.config} with {', '.join(given)}" if given else str(args.config)
    return load_config(args.config, overrides=overrides, origin=origin)


def _run(args: argparse.Namespace) -> int:
    config = run_config(args)
    if not config.cameras:
        raise ConfigError(f"{args.config}: cameras: at least one camera is needed (or pass --source)")
    if config.events.sink.kind == "redis" and not args.start_without_redis:
        # Before the models load: a Redis that is not there costs one line, not a run whose events are all lost.
        check_redis(config.events.redis_url, config.events.password_value, config.events.socket_timeout_s)
    return _run_pipeline(args, config)


def _run_pipeline(args: argparse.Namespace, config: PipelineConfig) -> int:
    from pipeline.banner import run_banner
    from pipeline.events import EventPublisher, ExpressionEvent
    from pipeline.exit_codes import ExitCode, run_exit_code
    from pipeline.metrics import PipelineMetrics, serve_metrics
    from pipeline.runner import ModelStages, StreamPipeline
    from pipeline.summary import SummaryPrinter
    from pipeline.warmup import warm_up_classifier, warm_up_detector

    metrics = PipelineMetrics()
    metrics_url = None
    if config.metrics.enabled:
        port = serve_metrics(metrics, config.metrics.host, config.metrics.port)
        metrics_url = f"http://{config.metrics.host}:{port}/metrics"
        log.info("metrics on %s", metrics_url)
    models = ModelStages.build(config)
    warm_up_detector(models.detector, models.detection_size)
    warm_up_classifier(models.classifier)
    publisher = EventPublisher(config.events, metrics)

    summary_every = args.summary_every if args.summary_every is not None else (DEFAULT_SUMMARY_S if args.print_events else 0.0)
    banner = run_banner(
        config,
        model_id=models.classifier.model_id,
        metrics_url=metrics_url,
        print_events=args.print_events,
        summary_every_s=summary_every,
        max_seconds=args.max_seconds,
    )
    print("\n".join(banner), file=sys.stderr, flush=True)
    printer = SummaryPrinter(summary_every, sys.stderr) if summary_every > 0 else None

    tracks: set[tuple[str, int]] = set()  # for the closing line, with or without a summary

    def on_events(camera_id: str, events: list[ExpressionEvent]) -> None:
        for event in events:
            tracks.add((camera_id, event.track_id))
            if args.print_events or printer is not None:
                record = event.to_json_dict()
                if args.print_events:
                    print(json.dumps(record, separators=(",", ":")), flush=True)
                if printer is not None:
                    printer.observe(record)
        if printer is not None:
            printer.report_if_due()

    pipeline = StreamPipeline(config, metrics, models, publisher, on_events=on_events)

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: stopping", signum)
        pipeline.stop()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    statuses: list[SourceStatus] = []
    try:
        for camera in config.cameras:
            pipeline.add_camera(camera)
        pipeline.run(max_seconds=args.max_seconds)
        statuses = pipeline.statuses()  # before close: it removes the cameras
        # Stop decoding, then deliver the outage buffer (pipeline.shutdown's order; no leases here).
        pipeline.stop_sources()
        publisher.close(args.close_timeout)  # pipeline.close() closes it again, which does nothing
    finally:
        pipeline.close()
    totals = run_totals(metrics, statuses, tracks)
    code = run_exit_code(statuses, totals.events_lost)
    print(f"ferstream run: {totals.format()}", file=sys.stderr)
    if code == ExitCode.NO_CAMERA_WORKED:
        print("ferstream run: no camera worked (exit 3); see the camera errors above", file=sys.stderr)
    elif code == ExitCode.EVENTS_LOST:
        print(f"ferstream run: {totals.events_lost} events were not delivered (exit 4)", file=sys.stderr)
    return int(code)


def _sample_sum(metrics: PipelineMetrics, name: str, **labels: str) -> float:
    """Sum of a prometheus-client sample over every label set that matches ``labels``."""
    total = 0.0
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(key) == value for key, value in labels.items()):
                total += sample.value
    return total


def run_totals(metrics: PipelineMetrics, statuses: Sequence[SourceStatus], tracks: set[tuple[str, int]]) -> RunTotals:
    return RunTotals(
        frames_decoded=sum(status.frames_decoded for status in statuses),
        frames_processed=int(_sample_sum(metrics, "ferstream_frames_processed_total")),
        frames_dropped=sum(status.frames_dropped for status in statuses),
        faces=int(_sample_sum(metrics, "ferstream_faces_detected_total")),
        events_published=int(_sample_sum(metrics, "ferstream_events_published_total")),
        # Both are events that never reached the sink: left over at close, or pushed out of a full outage buffer.
        events_lost=int(_sample_sum(metrics, "ferstream_events_dropped_total")),
        tracks=len(tracks),
    )


def _tail(args: argparse.Namespace) -> int:
    from pipeline.events import RETRYABLE_ERRORS, redis_client, stream_key, tail
    from pipeline.summary import SummarizingWriter, SummaryPrinter

    password = os.environ.get(REDIS_PASSWORD_ENV) or None
    block_ms = 1000
    check_redis(args.redis_url, password, 5.0)
    print(
        f"ferstream tail: events of camera {args.camera}, stream {stream_key(args.prefix, args.camera)} on Redis "
        f"{redis_address(args.redis_url)}: one JSON line per face per processed frame"
        + (f"; a per-track summary every {args.summary_every:g} s here" if args.summary_every > 0 else "")
        + "; Ctrl-C to stop",
        file=sys.stderr,
        flush=True,
    )
    printer = SummaryPrinter(args.summary_every, sys.stderr) if args.summary_every > 0 else None
    out = SummarizingWriter(sys.stdout, printer) if printer is not None else sys.stdout
    client = redis_client(args.redis_url, 5.0 + block_ms / 1000, password)
    try:
        tail(args.redis_url, args.prefix, args.camera, args.from_start, args.count, out, block_ms=block_ms, client=client)
    except RETRYABLE_ERRORS as error:
        raise unreachable(args.redis_url, error, password, what="lost") from None
    finally:
        client.close()
        if printer is not None:
            print(f"ferstream tail: {printer.summary.events_total} events, {len(printer.summary.tracks_total)} tracks", file=sys.stderr)
    return 0


def _delegate(module: str, argv: Sequence[str]) -> int:
    """Training, evaluation, export and margin calibration keep their own flat argparse (torchvision-references style)."""
    import importlib

    return int(importlib.import_module(module).main(list(argv)))


@dataclass(frozen=True)
class DelegatedCommand:
    module: str
    summary: str  # the top-level help's line; the module's own parser has the details


# The summaries live here rather than in the modules so that `ferstream --help` does not import torch.
DELEGATED = {
    "train": DelegatedCommand("pipeline.training.train", "train an expression classifier from scratch (FER2013, FER+, RAF-DB, AffectNet)"),
    "automl": DelegatedCommand(
        "pipeline.training.automl", "search architectures and hyperparameters on Ray Tune (ASHA); a leaderboard and the best checkpoints"
    ),
    "eval": DelegatedCommand(
        "pipeline.training.evaluate", "score a checkpoint on a labelled split: accuracy, per-class recall, confusion PNG"
    ),
    "export": DelegatedCommand("pipeline.training.export", "export a checkpoint to ONNX or TorchScript, checked against PyTorch"),
    "calibrate-margin": DelegatedCommand(
        "pipeline.training.calibrate_margin", "choose detector.face_margin, the crop margin, on the service's own detector crops"
    ),
    "eval-stream": DelegatedCommand(
        "pipeline.training.eval_stream", "score a checkpoint on FER faces pasted into H.264 video: by face size and bitrate, JSON and plot"
    ),
    "ensemble": DelegatedCommand(
        "pipeline.training.ensemble", "combine checkpoints into one ensemble model file (greedy selection on val, or given weights)"
    ),
    "distill": DelegatedCommand(
        "pipeline.training.distill", "train a student on a teacher model's soft labels (every train option, --resume auto)"
    ),
    "calibrate": DelegatedCommand(
        "pipeline.training.calibrate", "fit a softmax temperature on val and fold it into the model file (calibrated confidence)"
    ),
    "explain": DelegatedCommand("pipeline.training.explain", "Grad-CAM overlays (PNG) of what a model looks at in face crops"),
    "adjust-logits": DelegatedCommand(
        "pipeline.training.logit_adjust", "fold a logit adjustment for class imbalance into a checkpoint (tau chosen on val)"
    ),
}

DESCRIPTION = "ferstream: run the pipeline, tail its events, and train, evaluate, export and calibrate expression models."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ferstream", description=DESCRIPTION)
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the single-process pipeline on the configured cameras")
    run.add_argument("--config", type=Path, default=Path("configs/pipeline.yaml"))
    run.add_argument("--source", help="replace the configured cameras with this one URL or path")
    run.add_argument("--camera-id", default="cam0", help="camera id for --source")
    run.add_argument("--loop", action="store_true", help="loop --source when it is a file")
    run.add_argument("--redis-url", help="override events.redis_url")
    run.add_argument("--print-events", action="store_true", help="print each published event as a JSON line")
    run.add_argument("--max-seconds", type=float, help="stop after this long")
    run.add_argument(
        "--summary-every",
        type=float,
        metavar="SECONDS",
        help=f"print each track's emotion over the last SECONDS to stderr every SECONDS "
        f"(default {DEFAULT_SUMMARY_S:g} with --print-events; 0: off)",
    )
    run.add_argument(
        "--close-timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="at exit, how long to keep delivering events buffered during a Redis outage (default 5)",
    )
    run.add_argument(
        "--start-without-redis",
        action="store_true",
        help="start even when Redis does not answer: events wait in memory until it does (default: exit 1)",
    )
    run.set_defaults(handler=_run)

    tail = commands.add_parser("tail", help="print a camera's events live")
    tail.add_argument("--camera", required=True)
    tail.add_argument(
        "--redis-url",
        default=os.environ.get(REDIS_URL_ENV) or "redis://127.0.0.1:6379/0",
        help=f"default: ${REDIS_URL_ENV}, else redis://127.0.0.1:6379/0; the password comes from ${REDIS_PASSWORD_ENV}",
    )
    tail.add_argument("--prefix", default="ferstream")
    tail.add_argument("--from-start", action="store_true", help="print the stream's history first")
    tail.add_argument("--count", type=int, help="stop after this many events")
    tail.add_argument(
        "--summary-every",
        type=float,
        default=DEFAULT_SUMMARY_S,
        metavar="SECONDS",
        help=f"print each track's emotion over the last SECONDS to stderr every SECONDS (default {DEFAULT_SUMMARY_S:g}; 0: off)",
    )
    tail.set_defaults(handler=_tail)

    for name, command in DELEGATED.items():
        # add_help=False: `ferstream eval --help` reaches the module's own parser.
        sub = commands.add_parser(name, help=command.summary, add_help=False)
        sub.set_defaults(module=command.module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.log_level != "DEBUG":
        # torch logs its internals at INFO (FakeTensor cache statistics at exit): not the user's business.
        logging.getLogger("torch").setLevel(logging.WARNING)
    if getattr(args, "module", None):
        return _delegate(args.module, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return int(args.handler(args))
    except ConfigError as error:
        print(f"ferstream: invalid configuration:\n{error}", file=sys.stderr)
        return 2
    except RedisUnreachable as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    from pipeline.entry import interruptible

    sys.exit(interruptible(main))
