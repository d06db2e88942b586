"""Helpers shared by the benchmark scripts: the shared clips, a redis-server on a free port, and a
description of the machine, the code and the model a result was measured with.

Deliberately independent of ``tests/`` (benchmarks must run without the test suite installed).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from pipeline.local_servers import RedisServer, free_port, wait_for_port, wait_until  # noqa: E402,F401 - re-exported

DEFAULT_CLIP = "head-pose-face-detection-female-and-male"
# Clip sets a benchmark can run at: as shared, or re-encoded upscaled to 1080p (what real cameras send).
RESOLUTIONS: dict[str, tuple[int, int] | None] = {"native": None, "1080p": (1920, 1080)}


# -- shared material ------------------------------------------------------------------------------


def shared_root() -> Path:
    """``$FERSTREAM_SHARED``, else ``../shared`` next to the repository (as the tests resolve it)."""
    return Path(os.environ.get("FERSTREAM_SHARED", REPO_ROOT.parent / "shared")).resolve()


def shared_clips() -> dict[str, Path]:
    return {path.stem: path for path in sorted((shared_root() / "media").glob("*.mp4"))}


def resolve_clip(name_or_path: str) -> Path:
    """A shared clip by stem (``head-pose-face-detection-female-and-male``) or any video path."""
    candidate = Path(name_or_path)
    if candidate.is_file():
        return candidate.resolve()
    clips = shared_clips()
    stem = candidate.stem if candidate.suffix else name_or_path
    if stem in clips:
        return clips[stem]
    known = ", ".join(clips) or f"none found in {shared_root() / 'media'} (set FERSTREAM_SHARED)"
    raise SystemExit(f"no clip {name_or_path!r}; shared clips: {known}")


@dataclass(frozen=True)
class ClipInfo:
    path: Path
    fps: float
    frames: int
    width: int
    height: int

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.path.name, "fps": self.fps, "frames": self.frames, "width": self.width, "height": self.height}


def decode_clip(path: Path) -> tuple[ClipInfo, list[Any]]:
    """Every frame of a clip as BGR uint8 arrays, and its properties."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        images = [frame.to_ndarray(format="bgr24") for frame in container.decode(stream)]
    height, width = images[0].shape[:2]
    return ClipInfo(path=path, fps=float(rate) if rate else 0.0, frames=len(images), width=width, height=height), images


def reencode_clip(source: Path, target: Path, size: tuple[int, int] | None, max_frames: int | None) -> Path:
    """``source`` re-encoded with libx264 (CRF 18) at the same frame rate, scaled (bicubic) to ``size``
    (width, height) if given, keeping only its first ``max_frames`` frames if given."""
    import av

    with av.open(str(source)) as reader, av.open(str(target), "w") as writer:
        video = reader.streams.video[0]
        rate = Fraction(video.average_rate or video.guessed_rate or 25)
        width, height = size or (video.codec_context.width, video.codec_context.height)
        stream = writer.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "18", "preset": "medium"}
        written = 0
        for frame in reader.decode(video):
            if max_frames is not None and written >= max_frames:
                break
            scaled = frame.reformat(width=width, height=height, format="yuv420p", interpolation="BICUBIC")
            scaled.pts, scaled.time_base = written, 1 / rate
            for packet in stream.encode(scaled):
                writer.mux(packet)
            written += 1
        for packet in stream.encode(None):
            writer.mux(packet)
    return target


# -- what was measured, where ---------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return None


def proc_stat_table() -> dict[int, tuple[list[str], str]]:
    """pid -> (the /proc/<pid>/stat fields after the command name, command line) for every process."""
    table: dict[int, tuple[list[str], str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        # The command name may contain spaces and parentheses: fields follow the last ')'.
        table[int(entry.name)] = (stat[stat.rfind(")") + 2 :].split(), cmdline or stat[stat.find("(") + 1 : stat.rfind(")")])
    return table


def _proc_cpu_ticks() -> dict[int, tuple[int, str]]:
    """pid -> (user + system CPU ticks, command line)."""
    return {pid: (int(fields[11]) + int(fields[12]), cmdline) for pid, (fields, cmdline) in proc_stat_table().items()}


def cpu_snapshot() -> dict[int, tuple[int, str]]:
    """Cumulative CPU ticks and command line of every process, for :func:`other_processes_cpu`."""
    return _proc_cpu_ticks()


def other_processes_cpu(
    before: dict[int, tuple[int, str]], after: dict[int, tuple[int, str]], seconds: float, exclude: set[int], min_percent: float = 2.0
) -> list[dict[str, Any]]:
    """Processes not in ``exclude`` (nor this one) that used at least ``min_percent`` of one core
    between two snapshots: what else ran during a measurement."""
    hz = os.sysconf("SC_CLK_TCK")
    busy = []
    for pid, (ticks, command) in after.items():
        if pid == os.getpid() or pid in exclude:
            continue
        percent = 100.0 * (ticks - before.get(pid, (0, ""))[0]) / hz / seconds
        if percent >= min_percent:
            busy.append({"pid": pid, "cpu_percent": round(percent, 1), "command": command[:160]})
    return sorted(busy, key=lambda item: -item["cpu_percent"])


def busy_processes(sample_s: float = 2.0, min_percent: float = 5.0) -> list[dict[str, Any]]:
    """Processes that used at least ``min_percent`` of one core over a ``sample_s`` sample (this one excluded)."""
    hz = os.sysconf("SC_CLK_TCK")
    before = _proc_cpu_ticks()
    time.sleep(sample_s)
    after = _proc_cpu_ticks()
    busy = []
    for pid, (ticks, command) in after.items():
        if pid == os.getpid() or pid not in before:
            continue
        percent = 100.0 * (ticks - before[pid][0]) / hz / sample_s
        if percent >= min_percent:
            busy.append({"pid": pid, "cpu_percent": round(percent, 1), "command": command[:160]})
    return sorted(busy, key=lambda item: -item["cpu_percent"])


def machine_description() -> dict[str, Any]:
    import torch

    return {
        "cpu": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "memory_gib": _mem_total_gib(),
        "gpu": torch.cuda.is_available(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def git_description() -> dict[str, Any]:
    def git(*args: str) -> str:
        # Only trailing newlines go: porcelain lines start with a significant space (" M path").
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30).stdout.rstrip("\n")

    dirty = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines() if line.strip()]
    return {"commit": git("rev-parse", "--short", "HEAD"), "modified_tracked_files": dirty}


def model_description(checkpoint: Path | None = None) -> dict[str, Any]:
    """The model a config's ``classifier.checkpoint`` names: a ``.pt`` checkpoint or (``.onnx``) its ONNX export."""
    from pipeline.checkpoint import default_checkpoint_path, load_checkpoint
    from pipeline.runtimes.onnx_runtime import load_onnx

    path = Path(checkpoint).expanduser() if checkpoint is not None else default_checkpoint_path()
    onnx = path.suffix == ".onnx"
    _model, metadata = load_onnx(path) if onnx else load_checkpoint(path)
    return {
        "checkpoint": str(path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path),
        **({"format": "onnx"} if onnx else {}),
        "model_id": metadata.model_id,
        "arch": metadata.arch,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "mtime_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(path.stat().st_mtime)),
    }


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def write_result(path: Path, **fields: Any) -> None:
    """A benchmark's JSON result: when, the command, the machine and the code, then ``fields``."""
    result = {"when": utc_now(), "command": command_line(), "machine": machine_description(), "git": git_description(), **fields}
    path.write_text(json.dumps(result, indent=2))


def command_line() -> str:
    return " ".join(["python", *sys.argv])


# -- output ---------------------------------------------------------------------------------------


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default) of already sorted values."""
    if not sorted_values:
        return float("nan")
    position = (len(sorted_values) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)
