"""Every URL scheme the policy accepts has a registered reader, and PyAV loads only when one is built."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline.sources.pyav_reader import PyAVFrameReader
from pipeline.sources.readers import FRAME_READER_BUILDERS, READER_FOR_SCHEME, frame_reader_for
from pipeline.url_policy import ALLOWED_SCHEMES


def test_every_allowed_scheme_has_a_registered_reader():
    assert set(READER_FOR_SCHEME) == set(ALLOWED_SCHEMES)
    assert set(READER_FOR_SCHEME.values()) <= set(FRAME_READER_BUILDERS)


@pytest.mark.parametrize("url", ["rtsp://cam/1", "rtsps://cam/1", "http://cdn/x.m3u8", "https://cdn/x.m3u8", "file:///v/a.mp4", "/v/a.mp4"])
def test_today_pyav_reads_every_scheme(url):
    assert isinstance(frame_reader_for(url), PyAVFrameReader)


def test_the_records_the_camera_and_their_users_do_not_load_pyav():
    # The camera registry (pipeline/registry.py) runs in the Serve Controller, which never decodes video.
    modules = "pipeline.frames, pipeline.sources.readers, pipeline.sources.camera, pipeline.registry, pipeline.exit_codes"
    code = f"import sys, {modules}; print('av' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert result.stdout.strip() == "False"
