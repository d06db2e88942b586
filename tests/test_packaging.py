"""pyproject.toml's metadata builds without setuptools deprecation warnings (they used to fill ~50 lines of every install)."""

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

BUILD_METADATA = "from setuptools import build_meta; print(build_meta.prepare_metadata_for_build_wheel('meta'))"


def test_the_package_metadata_builds_without_deprecation_warnings(tmp_path):
    # A copy with empty packages: the metadata only needs pyproject.toml, the readme and the package folders.
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    shutil.copy(REPO / "README.md", tmp_path)
    for package in ("pipeline", "serve_app"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").touch()
    (tmp_path / "meta").mkdir()
    build = subprocess.run(
        [sys.executable, "-W", "always", "-c", BUILD_METADATA], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert build.returncode == 0, build.stderr[-2000:]
    assert "deprecat" not in (build.stdout + build.stderr).lower(), build.stderr[-3000:]
    metadata = next((tmp_path / "meta").glob("*.dist-info")) / "METADATA"
    assert "License-Expression: Apache-2.0" in metadata.read_text().splitlines()
