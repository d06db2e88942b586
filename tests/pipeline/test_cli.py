"""The `ferstream` command as users run it: a real process, a real redis-server, a shared clip."""

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import build_parser, main, run_config
from pipeline.config import ConfigError, EventsConfig, PipelineConfig, load_config
from pipeline.events import RedisStreamSink, validate_event_dict
from tests.pipeline.events.helpers import make_event
from tests.support import free_port, redis_server_requires_password

REPO = Path(__file__).resolve().parents[2]


def ferstream(*args: str, timeout: float = 240, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {key: value for key, value in os.environ.items() if not key.startswith("FERSTREAM_REDIS_")}
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**environ, **(env or {})},
    )


def test_a_bad_config_fails_at_start_with_the_field_named(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("cameras: [{camera_id: a, url: a.mp4, target_fps: -1}]\n")
    assert main(["run", "--config", str(config)]) == 2
    assert "cameras.0.target_fps" in capsys.readouterr().err


def test_a_bad_source_url_fails_at_start(capsys):
    assert main(["run", "--config", str(REPO / "configs/demo.yaml"), "--source", "ftp://host/video"]) == 2
    assert "configs/demo.yaml with --source: cameras.0.url: Value error, unsupported URL scheme 'ftp'" in capsys.readouterr().err


def run_args(*argv: str) -> argparse.Namespace:
    args, _rest = build_parser().parse_known_args(["run", *argv])
    return args


def test_run_config_validates_the_file_with_its_overrides_once(monkeypatch):
    validated = []
    real_model_validate = PipelineConfig.model_validate

    def counting(data, *args, **kwargs):
        validated.append(data)
        return real_model_validate(data, *args, **kwargs)

    monkeypatch.setattr(PipelineConfig, "model_validate", counting)
    args = run_args(
        "--config", str(REPO / "configs/demo.yaml"), "--source", "rtsp://cam/s", "--camera-id", "door", "--redis-url", "redis://flag:6379/0"
    )
    config = run_config(args, {"FERSTREAM_REDIS_URL": "redis://env:6379/0", "FERSTREAM_REDIS_PASSWORD": "env-pw"})
    assert len(validated) == 1
    assert [(camera.camera_id, camera.url) for camera in config.cameras] == [("door", "rtsp://cam/s")]
    # The flag beats the ambient variable; the file's other events settings stay.
    assert config.events.redis_url == "redis://flag:6379/0" and config.events.password_value == "env-pw"
    assert config.events == load_config(REPO / "configs/demo.yaml").events.model_copy(
        update={"redis_url": "redis://flag:6379/0", "password": config.events.password}
    )


def test_run_config_without_overrides_is_the_file():
    assert run_config(run_args("--config", str(REPO / "configs/demo.yaml")), {}) == load_config(REPO / "configs/demo.yaml")


def test_a_bad_redis_url_from_the_environment_is_named():
    with pytest.raises(ConfigError, match=r"demo\.yaml with FERSTREAM_REDIS_URL: events\.redis_url: "):
        run_config(run_args("--config", str(REPO / "configs/demo.yaml")), {"FERSTREAM_REDIS_URL": "http://nope"})


def test_run_prints_events_that_reach_redis_and_tail_reads_them(redis_server, shared_clips):
    clip = shared_clips["face-demographics-walking-and-pause"]
    run = ferstream(
        "run", "--config", "configs/demo.yaml", "--source", str(clip), "--camera-id", "lobby",
        "--loop", "--redis-url", redis_server.url, "--print-events", "--max-seconds", "15",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    printed = [json.loads(line) for line in run.stdout.splitlines()]
    assert len(printed) >= 3 * 5, f"expected events for the 3 people, got {len(printed)}: {run.stderr[-1000:]}"
    for event in printed:
        validate_event_dict(event)
        assert event["camera_id"] == "lobby"
    # The closing line adds up what was printed; the banner came first and said where the events go.
    closing = run.stderr.splitlines()[-1]
    assert closing.endswith(f"{len(printed)} events delivered, 0 lost; {len({event['track_id'] for event in printed})} tracks"), closing
    assert run.stderr.index("ferstream run:\n  camera    lobby: ") < run.stderr.index("summary: camera lobby track ")

    tail = ferstream("tail", "--camera", "lobby", "--redis-url", redis_server.url, "--from-start", "--count", str(len(printed)), timeout=60)
    assert tail.returncode == 0, tail.stderr[-2000:]
    assert [json.loads(line) for line in tail.stdout.splitlines()] == printed


def test_help_texts_name_each_command_and_summarise_it():
    top = ferstream("--help", timeout=60)
    assert top.returncode == 0 and "``" not in top.stdout
    assert "see `ferstream" not in top.stdout
    for name in (
        "train",
        "eval",
        "eval-stream",
        "export",
        "calibrate-margin",
        "adjust-logits",
        "ensemble",
        "distill",
        "calibrate",
        "explain",
    ):
        sub = ferstream(name, "--help", timeout=120)
        assert sub.returncode == 0, sub.stderr[-2000:]
        assert sub.stdout.startswith(f"usage: ferstream {name} "), sub.stdout[:200]
        assert "``" not in sub.stdout


def test_eval_output_help_says_where_the_png_goes():
    from pipeline.training.evaluate import default_checkpoint_path, default_plot_path, get_args_parser

    # argparse wraps long paths mid-word, so check the help string itself against where the PNG really goes.
    output = next(action for action in get_args_parser()._actions if "--output" in action.option_strings)
    shipped = default_plot_path(default_checkpoint_path())
    assert str(shipped).replace(str(Path.home()), "~") in output.help


def test_run_exits_3_when_its_only_camera_cannot_be_opened(redis_server, tmp_path):
    run = ferstream("run", "--config", "configs/demo.yaml", "--source", str(tmp_path / "missing.mp4"), "--redis-url", redis_server.url)
    assert run.returncode == 3, run.stderr[-2000:]
    assert "No such file or directory" in run.stderr and "no camera worked (exit 3)" in run.stderr
    assert "Traceback" not in run.stderr


def test_run_exits_4_when_it_closes_with_events_undelivered(shared_clips):
    clip = shared_clips["face-demographics-walking-and-pause"]
    nobody = f"redis://127.0.0.1:{free_port()}/0"
    run = ferstream(
        "run", "--config", "configs/demo.yaml", "--source", str(clip), "--loop", "--redis-url", nobody, "--start-without-redis",
        "--close-timeout", "0.2", "--print-events", "--max-seconds", "15",
    )  # fmt: skip
    assert run.returncode == 4, run.stderr[-2000:]
    printed = len(run.stdout.splitlines())
    assert printed > 0, run.stderr[-2000:]
    # Every printed event was lost: none reached a Redis that was never there.
    assert f"0 events delivered, {printed} lost" in run.stderr, run.stderr[-2000:]
    assert f"{printed} events were not delivered (exit 4)" in run.stderr


def test_run_with_redis_unreachable_fails_at_start_in_one_line_without_the_password():
    port = free_port()
    run = ferstream("run", "--config", "configs/demo.yaml", "--redis-url", f"redis://:hunter2@127.0.0.1:{port}/0", timeout=60)
    assert run.returncode == 1
    assert run.stderr == f"error: cannot reach Redis at 127.0.0.1:{port}: Connection refused\n"


def test_tail_with_redis_unreachable_fails_in_one_line():
    port = free_port()
    tail = ferstream("tail", "--camera", "door", timeout=60, env={"FERSTREAM_REDIS_URL": f"redis://127.0.0.1:{port}/0"})
    assert tail.returncode == 1
    assert tail.stderr == f"error: cannot reach Redis at 127.0.0.1:{port}: Connection refused\n"


def test_tail_reads_url_and_password_from_the_environment_and_summarises_at_exit(redis_server):
    redis_server_requires_password(redis_server.port, "s3cret-pw")
    sink = RedisStreamSink(EventsConfig(redis_url=redis_server.url, password="s3cret-pw"))
    sink.write([make_event(camera_id="door", track_id=4, emotion="happy")])
    sink.close()
    args = ("tail", "--camera", "door", "--from-start", "--count", "1")
    without = ferstream(*args, timeout=60, env={"FERSTREAM_REDIS_URL": redis_server.url})
    assert without.returncode == 1 and re.fullmatch(
        rf"error: cannot reach Redis at 127.0.0.1:{redis_server.port}: .*auth.*\n", without.stderr, re.I
    )
    tail = ferstream(*args, timeout=60, env={"FERSTREAM_REDIS_URL": redis_server.url, "FERSTREAM_REDIS_PASSWORD": "s3cret-pw"})
    assert tail.returncode == 0, tail.stderr
    [line] = tail.stdout.splitlines()
    assert json.loads(line)["track_id"] == 4
    assert tail.stderr.splitlines()[-1] == "ferstream tail: 1 events, 1 tracks"
    assert "s3cret-pw" not in tail.stderr + without.stderr


def test_tail_says_in_one_line_when_redis_goes_away(redis_server):
    environ = {key: value for key, value in os.environ.items() if not key.startswith("FERSTREAM_REDIS_")}
    tail = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "tail", "--camera", "door", "--redis-url", redis_server.url],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environ,
    )  # fmt: skip
    try:
        assert tail.stderr is not None
        assert tail.stderr.readline().startswith("ferstream tail: events of camera door")  # connected and reading
        redis_server.stop()
        _out, err = tail.communicate(timeout=60)
    finally:
        tail.kill()
    assert tail.returncode == 1
    # The closing count first (tail's own finally), then the error: the last line says why it stopped.
    assert re.fullmatch(rf"ferstream tail: 0 events, 0 tracks\nerror: lost Redis at 127.0.0.1:{redis_server.port}: [^\n]+\n", err), err
    assert "Traceback" not in err
