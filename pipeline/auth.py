"""Bearer tokens for the HTTP API: where they come from, how a request's token is checked, and
when the API may run without any.

- Tokens come from ``FERSTREAM_API_TOKENS`` (comma-separated) and/or ``FERSTREAM_API_TOKEN_FILE``
  (one token per line, blank lines and ``#`` comments ignored: a Kubernetes Secret mounted as a
  file). Both are read in the process that answers requests, so tokens never travel through Ray's
  application arguments, which Ray stores and shows in its dashboard and logs.
- The file is re-read when it changes (a Secret's mounted files are replaced on rotation), so
  adding or revoking a token needs no restart.
- A request passes with ``Authorization: Bearer <token>`` equal to any configured token. Each
  comparison is ``hmac.compare_digest`` of SHA-256 digests (equal lengths, so not even a token's
  length leaks through timing), and all tokens are compared, whichever matches.
- Without any token the API is open, which ``check_exposure`` allows only on a loopback HTTP host,
  or anywhere when the operator says ``FERSTREAM_API_AUTH=disabled``.

Ray-free: ``serve_app`` wires it into the Controller; tests use it directly.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import ConfigError

API_TOKENS_ENV = "FERSTREAM_API_TOKENS"
API_TOKEN_FILE_ENV = "FERSTREAM_API_TOKEN_FILE"
API_AUTH_ENV = "FERSTREAM_API_AUTH"
AUTH_DISABLED = "disabled"
AUTH_MODES = ("required", AUTH_DISABLED)

# RFC 6750: the challenge a 401 carries.
WWW_AUTHENTICATE = 'Bearer realm="ferstream"'

log = logging.getLogger("ferstream.auth")


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def _check_token(token: str, origin: str) -> str:
    # A token travels in an HTTP header: characters a header cannot carry would make it unusable.
    if any(ord(character) < 0x21 or ord(character) > 0x7E for character in token):
        raise ConfigError(f"{origin}: a token contains whitespace, a control or a non-ASCII character (tokens are not shown)")
    return token


def parse_token_list(value: str, origin: str = API_TOKENS_ENV) -> list[str]:
    """Comma-separated tokens; empty items (``a,,b``, a trailing comma) are ignored."""
    return [_check_token(item.strip(), origin) for item in value.split(",") if item.strip()]


def parse_token_file(text: str, origin: str = API_TOKEN_FILE_ENV) -> list[str]:
    """One token per line; blank lines and lines starting with ``#`` are ignored."""
    tokens = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            tokens.append(_check_token(stripped, f"{origin} line {number}"))
    return tokens


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (scheme case-insensitive), else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def is_loopback_host(host: str | None) -> bool:
    """True for ``localhost`` and loopback addresses; False for ``0.0.0.0``, ``::``, other names and None."""
    if host is None:
        return False
    name = host.strip().strip("[]").rstrip(".").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class _FileState:
    identity: tuple[int, int, int]  # (inode, size, mtime_ns): a replaced or edited file differs
    digests: tuple[bytes, ...]


class ApiTokens:
    """The configured tokens: fixed ones (the environment variable) plus a file, re-read when it changes."""

    def __init__(self, tokens: Iterable[str] = (), token_file: Path | None = None) -> None:
        self._fixed = tuple(_digest(token) for token in tokens)
        self._file = token_file
        self._lock = threading.Lock()
        self._file_state: _FileState | None = None
        if token_file is not None:
            self._file_state = self._read_file(token_file)  # unreadable at start: fail now, naming the file

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> ApiTokens:
        environ = os.environ if environ is None else environ
        tokens = parse_token_list(environ.get(API_TOKENS_ENV, ""))
        file_name = environ.get(API_TOKEN_FILE_ENV, "").strip()
        return cls(tokens, Path(file_name) if file_name else None)

    @staticmethod
    def _identity(path: Path) -> tuple[int, int, int]:
        stat = path.stat()  # follows links: a Secret volume swaps a symlink to a new directory
        return (stat.st_ino, stat.st_size, stat.st_mtime_ns)

    @classmethod
    def _read_file(cls, path: Path) -> _FileState:
        try:
            identity = cls._identity(path)
            text = path.read_text(encoding="utf-8")
        except OSError as error:
            raise ConfigError(f"{API_TOKEN_FILE_ENV}: cannot read {path}: {error.strerror or error}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{API_TOKEN_FILE_ENV}: {path} is not UTF-8 text") from None
        return _FileState(identity, tuple(_digest(token) for token in parse_token_file(text, f"{API_TOKEN_FILE_ENV} ({path})")))

    def _file_digests(self) -> tuple[bytes, ...]:
        if self._file is None:
            return ()
        with self._lock:
            state = self._file_state
            try:
                if state is None or self._identity(self._file) != state.identity:
                    state = self._file_state = self._read_file(self._file)
            except (OSError, ConfigError) as error:
                # Mid-rotation or removed: keep the tokens last read rather than lock every client out.
                # The message names the file only, never its contents.
                log.warning("API token file: keeping the tokens last read: %s", error)
            return state.digests if state is not None else ()

    @property
    def configured(self) -> bool:
        return bool(self._fixed or self._file_digests())

    def count(self) -> int:
        return len(self._fixed) + len(self._file_digests())

    def accepts(self, token: str | None) -> bool:
        """True when ``token`` equals a configured token; every token is compared, in constant time each."""
        if token is None:
            return False
        presented = _digest(token)
        matched = False
        for digest in (*self._fixed, *self._file_digests()):
            matched |= hmac.compare_digest(presented, digest)
        return matched


class ApiAuth:
    """What the API does with a request's ``Authorization`` header."""

    def __init__(self, tokens: ApiTokens, required: bool) -> None:
        self.tokens = tokens
        self.required = required

    def allows(self, authorization: str | None) -> bool:
        return not self.required or self.tokens.accepts(bearer_token(authorization))


def auth_mode(environ: Mapping[str, str]) -> str:
    mode = environ.get(API_AUTH_ENV, "").strip().lower() or "required"
    if mode not in AUTH_MODES:
        raise ConfigError(f"{API_AUTH_ENV}: {mode!r} is not one of {', '.join(AUTH_MODES)}")
    return mode


def check_exposure(tokens: ApiTokens, http_host: str | None, environ: Mapping[str, str] | None = None) -> ApiAuth:
    """The API's auth for Serve's HTTP host ``http_host`` (None: unknown, treated as exposed).

    Raises ConfigError when no token is configured, the host is not loopback and the operator did
    not set ``FERSTREAM_API_AUTH=disabled``: an open API on a reachable address lets anyone add
    cameras (whose URLs the service then opens) and read every camera's status."""
    environ = os.environ if environ is None else environ
    mode = auth_mode(environ)
    if tokens.configured:
        if mode == AUTH_DISABLED:
            log.warning("%s=%s is ignored: API tokens are configured, so requests must carry one", API_AUTH_ENV, AUTH_DISABLED)
        return ApiAuth(tokens, required=True)
    if is_loopback_host(http_host) or mode == AUTH_DISABLED:
        log.warning("the HTTP API runs without authentication (no %s or %s; HTTP host %s)", API_TOKENS_ENV, API_TOKEN_FILE_ENV, http_host)
        return ApiAuth(tokens, required=False)
    raise ConfigError(
        f"refusing to start the HTTP API without authentication on a non-loopback host ({http_host or 'unknown'}): "
        f"set {API_TOKENS_ENV} (comma-separated tokens) or {API_TOKEN_FILE_ENV} (a file with one token per line), "
        f"or set {API_AUTH_ENV}={AUTH_DISABLED} to run it without authentication"
    )
