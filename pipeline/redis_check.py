"""Is Redis there? One ``PING`` with fail-fast timeouts, and an error message a user can act on.

The CLI asks before it loads any model, so a typo in the URL or a Redis that was never started
costs one line (``error: cannot reach Redis at 127.0.0.1:6379: Connection refused``) instead of
a 50-line traceback or a run whose events all end up lost at close.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import redis

from pipeline.events import RETRYABLE_ERRORS, redis_client


class RedisUnreachable(RuntimeError):
    """Redis did not answer a ``PING``; the message names the address, never the password."""


def redis_address(url: str) -> str:
    """``host:port`` of a redis:// or rediss:// URL (the socket path of unix://), without credentials."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return parts.path or url
    host = parts.hostname or "127.0.0.1"
    if ":" in host:  # IPv6
        host = f"[{host}]"
    return f"{host}:{parts.port or 6379}"


def _reason(error: BaseException, secrets: list[str]) -> str:
    text = str(error).strip() or type(error).__name__
    # redis-py says "Error 111 connecting to 127.0.0.1:6379. Connection refused.": keep the why, the address is already in front.
    text = re.sub(r"^Error -?\d+ connecting to \S+?\.\s+", "", text).rstrip(".")
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def unreachable(url: str, error: BaseException, password: str | None = None, what: str = "cannot reach") -> RedisUnreachable:
    """The one-line error for a Redis failure: ``<what> Redis at host:port: <reason>``, any password masked."""
    secrets = [secret for secret in (password, urlsplit(url).password) if secret]
    return RedisUnreachable(f"{what} Redis at {redis_address(url)}: {_reason(error, secrets)}")


def check_redis(url: str, password: str | None = None, timeout_s: float = 2.0) -> None:
    """Raise ``RedisUnreachable`` unless the Redis at ``url`` answers ``PING`` within ``timeout_s``."""
    try:
        client = redis_client(url, timeout_s, password)
    except (ValueError, redis.RedisError) as error:  # a URL redis-py cannot parse
        raise unreachable(url, error, password) from None
    try:
        client.ping()
    except RETRYABLE_ERRORS as error:
        raise unreachable(url, error, password) from None
    finally:
        client.close()
