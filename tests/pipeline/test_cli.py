"""The `ferstream` command as users run it: a real process, a real redis-server, a shared clip."""

import json
import subprocess
import sys
from pathlib import Path

from pipeline.cli import main
from pipeline.events import validate_event_dict

REPO = Path(__file__).resolve().parents[2]


def ferstream(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_a_bad_config_fails_at_start_with_the_field_named(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("cameras: [{camera_id: a, url: a.mp4, target_fps: -1}]\n")
    assert main(["run", "--config", str(config)]) == 2
    assert "cameras.0.target_fps" in capsys.readouterr().err


def test_a_bad_source_url_fails_at_start(capsys):
    assert main(["run", "--config", str(REPO / "configs/demo.yaml"), "--source", "ftp://host/video"]) == 2
    assert "--source: url: Value error, unsupported URL scheme 'ftp'" in capsys.readouterr().err


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

    tail = ferstream("tail", "--camera", "lobby", "--redis-url", redis_server.url, "--from-start", "--count", str(len(printed)), timeout=60)
    assert tail.returncode == 0, tail.stderr[-2000:]
    assert [json.loads(line) for line in tail.stdout.splitlines()] == printed


def test_help_texts_name_each_command_and_summarise_it():
    top = ferstream("--help", timeout=60)
    assert top.returncode == 0 and "``" not in top.stdout
    assert "see `ferstream" not in top.stdout
    for name in ("train", "eval", "export", "calibrate-margin", "adjust-logits", "ensemble", "distill", "calibrate", "explain"):
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
