"""Which ``FrameReader`` opens which source: readers by name, and the reader for each URL scheme.

A reader module is imported only when a camera needs it, so a process that never opens a video
(the Controller, the config check) never loads PyAV.
"""

from __future__ import annotations

from collections.abc import Callable

from pipeline.sources.reader import FrameReader
from pipeline.url_policy import url_scheme


def _pyav_reader() -> FrameReader:
    from pipeline.sources.pyav_reader import PyAVFrameReader

    return PyAVFrameReader()


FRAME_READER_BUILDERS: dict[str, Callable[[], FrameReader]] = {
    "pyav": _pyav_reader,
}

# Every scheme url_policy.ALLOWED_SCHEMES accepts (a bare path counts as "file") has a reader.
READER_FOR_SCHEME: dict[str, str] = {
    "rtsp": "pyav",
    "rtsps": "pyav",
    "http": "pyav",
    "https": "pyav",
    "file": "pyav",
}


def frame_reader_for(url: str) -> FrameReader:
    """A new reader for ``url``'s scheme. The URL passed the config's URL policy, so its scheme is known."""
    return FRAME_READER_BUILDERS[READER_FOR_SCHEME[url_scheme(url)]]()
