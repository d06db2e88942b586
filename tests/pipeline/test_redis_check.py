"""The Redis reachability check against a real redis-server and a port nobody listens on."""

import pytest

from pipeline.redis_check import RedisUnreachable, check_redis, redis_address
from tests.support import free_port, redis_server_requires_password


def test_the_address_never_carries_credentials():
    assert redis_address("redis://:hunter2@cache.example:6380/0") == "cache.example:6380"
    assert redis_address("rediss://user:pw@[::1]/1") == "[::1]:6379"
    assert redis_address("unix:///run/redis.sock") == "/run/redis.sock"


def test_a_running_redis_passes(redis_server):
    check_redis(redis_server.url)


def test_a_port_nobody_listens_on_is_one_line_naming_host_and_port():
    port = free_port()
    with pytest.raises(RedisUnreachable) as caught:
        check_redis(f"redis://:hunter2@127.0.0.1:{port}/0", timeout_s=0.5)
    assert str(caught.value) == f"cannot reach Redis at 127.0.0.1:{port}: Connection refused"


def test_a_wrong_or_missing_password_is_reported_without_the_password(redis_server):
    redis_server_requires_password(redis_server.port, "s3cret-pw")
    with pytest.raises(RedisUnreachable) as missing:
        check_redis(redis_server.url)
    assert str(missing.value).startswith(f"cannot reach Redis at 127.0.0.1:{redis_server.port}: ")
    assert "auth" in str(missing.value).lower()
    with pytest.raises(RedisUnreachable) as wrong:
        check_redis(redis_server.url, password="not-it-pw")
    assert "not-it-pw" not in str(wrong.value) and "s3cret-pw" not in str(wrong.value)
    check_redis(redis_server.url, password="s3cret-pw")
