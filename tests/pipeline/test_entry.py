"""The console script's Ctrl-C guard."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.entry import INTERRUPTED, interruptible

REPO = Path(__file__).resolve().parents[2]


def test_interruptible_passes_the_status_through_and_turns_ctrl_c_into_130(capsys: pytest.CaptureFixture[str]) -> None:
    assert interruptible(lambda: 4) == 4
    assert capsys.readouterr().err == ""

    def interrupted() -> int:
        raise KeyboardInterrupt

    assert interruptible(interrupted) == INTERRUPTED == 130
    assert capsys.readouterr().err == "ferstream: stopped (Ctrl-C)\n"


def test_ctrl_c_while_the_run_loads_its_modules_and_models_is_one_line_and_130(tmp_path: Path) -> None:
    # The fault the guard fixes: SIGINT 0.3 s after the start lands in the imports (pipeline.cli's, then
    # torch's and the models' inside the command), long before `ferstream run` installs its own handler,
    # and used to print a 30-line traceback out of importlib.
    script = shutil.which("ferstream", path=str(Path(sys.executable).parent))
    assert script is not None, "the ferstream console script is not installed next to this Python (scripts/setup.sh)"
    clip = tmp_path / "missing.mp4"  # never opened: the run is stopped before it gets there
    process = subprocess.Popen(
        [script, "run", "--source", str(clip), "--start-without-redis", "--max-seconds", "30"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Ctrl-C's default action in the child even where this test runs with SIGINT ignored (a CI shell's background job).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    time.sleep(0.3)
    process.send_signal(signal.SIGINT)
    _out, err = process.communicate(timeout=120)
    assert "ferstream run:" not in err, f"the run started before the signal came; the test proves nothing:\n{err[-2000:]}"
    assert process.returncode == INTERRUPTED, err[-2000:]
    assert "Traceback" not in err and err.strip().endswith("ferstream: stopped (Ctrl-C)"), err[-2000:]
