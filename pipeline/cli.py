"""The ``ferstream`` command: run the pipeline, tail events, train, evaluate, export and calibrate models."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from pipeline.config import ConfigError, PipelineConfig, SourceConfig, apply_environment, dump_config, load_config, parse_config

log = logging.getLogger("ferstream.cli")


def _run(args: argparse.Namespace) -> int:
    from pipeline.classification import ExpressionClassifier
    from pipeline.detection import build_detector
    from pipeline.events import EventPublisher
    from pipeline.metrics import PipelineMetrics, serve_metrics
    from pipeline.runner import ModelStages, StreamPipeline

    config = load_config(args.config)
    if args.source:
        camera = {"camera_id": args.camera_id, "url": args.source, "loop": args.loop}
        config = config.model_copy(update={"cameras": [parse_config(SourceConfig, camera, "--source")]})
    if args.redis_url:
        config = config.model_copy(update={"events": config.events.model_copy(update={"redis_url": args.redis_url})})
    config = apply_environment(parse_config(PipelineConfig, dump_config(config), str(args.config)))  # re-validate the overrides
    if not config.cameras:
        raise ConfigError(f"{args.config}: cameras: at least one camera is needed (or pass --source)")

    metrics = PipelineMetrics()
    if config.metrics.enabled:
        port = serve_metrics(metrics, config.metrics.host, config.metrics.port)
        log.info("metrics on http://%s:%d/metrics", config.metrics.host, port)
    models = ModelStages(
        detector=build_detector(config.detector),
        classifier=ExpressionClassifier(config.classifier),
        detection_size=config.detector.detection_size,
    )
    publisher = EventPublisher(config.events, metrics)

    def print_events(camera_id: str, events: list) -> None:  # noqa: ANN001 - events are ExpressionEvent
        for event in events:
            print(json.dumps(event.to_json_dict(), separators=(",", ":")), flush=True)

    pipeline = StreamPipeline(config, metrics, models, publisher, on_events=print_events if args.print_events else None)

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: stopping", signum)
        pipeline.stop()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    for camera in config.cameras:
        pipeline.add_camera(camera)
    try:
        pipeline.run(max_seconds=args.max_seconds)
    finally:
        pipeline.close()
    return 0


def _tail(args: argparse.Namespace) -> int:
    from pipeline.events import tail

    tail(args.redis_url, args.prefix, args.camera, from_start=args.from_start, count=args.count)
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
    "eval": DelegatedCommand(
        "pipeline.training.evaluate", "score a checkpoint on a labelled split: accuracy, per-class recall, confusion PNG"
    ),
    "export": DelegatedCommand("pipeline.training.export", "export a checkpoint to ONNX or TorchScript, checked against PyTorch"),
    "calibrate-margin": DelegatedCommand(
        "pipeline.training.calibrate_margin", "choose a checkpoint's face_margin on the service's own detector crops"
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
    run.set_defaults(handler=_run)

    tail = commands.add_parser("tail", help="print a camera's events live")
    tail.add_argument("--camera", required=True)
    tail.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    tail.add_argument("--prefix", default="ferstream")
    tail.add_argument("--from-start", action="store_true", help="print the stream's history first")
    tail.add_argument("--count", type=int, help="stop after this many events")
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
    if getattr(args, "module", None):
        return _delegate(args.module, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:  # Ctrl-C out of `tail` is the normal way to stop it
        return 130
    except ConfigError as error:
        print(f"ferstream: invalid configuration:\n{error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
