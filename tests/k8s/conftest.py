"""The overlay under test and its built objects, for every test module here."""

from __future__ import annotations

from typing import Any

import pytest

from tests.k8s.manifests import OVERLAYS, build


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def docs(overlay: str) -> tuple[dict[str, Any], ...]:
    return build(overlay)
