"""Helpers and fixtures shared by the pipeline tests."""

from collections.abc import Iterator
from typing import Any

import pytest
import redis

from pipeline.checkpoint import ModelMetadata
from pipeline.registry import CameraRegistry
from tests.conftest import RedisServer
from tests.pipeline.registry_support import PREFIX

CLASSES = ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")


def make_metadata(**overrides: Any) -> ModelMetadata:
    """A valid ModelMetadata for a small test model; keyword arguments replace fields."""
    values = dict(
        model_id="unit",
        arch="tiny",
        arch_kwargs={},
        classes=CLASSES,
        input_size=44,
        resize_to=48,
        grayscale=True,
        mean=(0.5,),
        std=(0.25,),
        face_margin=0.15,
        metrics={"accuracy": 0.5},
    )
    values.update(overrides)
    return ModelMetadata(**values)


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url, socket_timeout=5)
    yield client
    client.close()


@pytest.fixture
def registry(client: redis.Redis) -> CameraRegistry:
    return CameraRegistry(client, PREFIX, lease_s=5.0)
