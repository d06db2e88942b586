"""API tokens: parsing the environment and the token file, checking a request's header, the file's
re-read on rotation, and when the API may run without a token."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from pipeline.auth import (
    API_AUTH_ENV,
    API_TOKEN_FILE_ENV,
    API_TOKENS_ENV,
    ApiTokens,
    bearer_token,
    check_exposure,
    is_loopback_host,
    parse_token_file,
    parse_token_list,
)
from pipeline.config import ConfigError

TOKEN = "3f9c1e0b7a5d4c2e8f6a1b3c5d7e9f0a"
OTHER = "b1e2d3c4f5a60718293a4b5c6d7e8f90"


def test_token_list_splits_on_commas_and_ignores_empty_items() -> None:
    assert parse_token_list(f" {TOKEN} ,, {OTHER},") == [TOKEN, OTHER]
    assert parse_token_list("") == []


def test_token_file_skips_blank_lines_and_comments() -> None:
    text = f"# rotated 2026-12-01\n\n{TOKEN}\n   \n  # old one below, kept until clients move\n{OTHER}  \n"
    assert parse_token_file(text) == [TOKEN, OTHER]


def test_a_token_with_whitespace_inside_is_refused_without_showing_it() -> None:
    with pytest.raises(ConfigError) as raised:
        parse_token_file("good-token\nhas space\n")
    assert "line 2" in str(raised.value) and "has space" not in str(raised.value)
    with pytest.raises(ConfigError, match=API_TOKENS_ENV):
        parse_token_list("tab\there")


@pytest.mark.parametrize(
    ("header", "token"),
    [
        (f"Bearer {TOKEN}", TOKEN),
        (f"bearer {TOKEN}", TOKEN),
        (f"  BEARER   {TOKEN}  ", TOKEN),
        (None, None),
        ("", None),
        ("Bearer", None),
        ("Bearer ", None),
        (f"Basic {TOKEN}", None),
        (TOKEN, None),
    ],
)
def test_bearer_token_reads_only_the_bearer_scheme(header: str | None, token: str | None) -> None:
    assert bearer_token(header) == token


def test_tokens_from_the_environment_and_the_file_are_both_accepted(tmp_path: Path) -> None:
    token_file = tmp_path / "tokens"
    token_file.write_text(f"{OTHER}\n")
    tokens = ApiTokens.from_environment({API_TOKENS_ENV: TOKEN, API_TOKEN_FILE_ENV: str(token_file)})
    assert tokens.configured and tokens.count() == 2
    assert tokens.accepts(TOKEN) and tokens.accepts(OTHER)
    assert not tokens.accepts(None)
    assert not tokens.accepts("")
    assert not tokens.accepts(TOKEN[:-1])  # a prefix
    assert not tokens.accepts(TOKEN + "0")  # a longer one
    assert not tokens.accepts(TOKEN.upper())  # tokens are case-sensitive


def test_no_environment_means_no_tokens() -> None:
    tokens = ApiTokens.from_environment({})
    assert not tokens.configured and tokens.count() == 0 and not tokens.accepts(TOKEN)


def test_an_unreadable_token_file_fails_at_start_naming_the_variable(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-file"
    with pytest.raises(ConfigError, match=f"{API_TOKEN_FILE_ENV}: cannot read {missing}"):
        ApiTokens.from_environment({API_TOKEN_FILE_ENV: str(missing)})
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="not UTF-8"):
        ApiTokens(token_file=binary)


def test_the_token_file_is_re_read_when_it_changes(tmp_path: Path) -> None:
    token_file = tmp_path / "tokens"
    token_file.write_text(f"{TOKEN}\n")
    tokens = ApiTokens(token_file=token_file)
    assert tokens.accepts(TOKEN) and not tokens.accepts(OTHER)

    # A Kubernetes Secret volume rotates by writing a new file and swapping a link to it.
    rotated = tmp_path / "tokens.new"
    rotated.write_text(f"{OTHER}\n")
    os.replace(rotated, token_file)
    assert tokens.accepts(OTHER) and not tokens.accepts(TOKEN)


def test_a_token_file_that_vanishes_keeps_the_tokens_last_read(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    token_file = tmp_path / "tokens"
    token_file.write_text(f"{TOKEN}\n")
    tokens = ApiTokens(token_file=token_file)
    token_file.unlink()
    with caplog.at_level(logging.WARNING, logger="ferstream.auth"):
        assert tokens.accepts(TOKEN)
    assert "keeping the tokens last read" in caplog.text and TOKEN not in caplog.text


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "LOCALHOST", "::1", "[::1]"])
def test_loopback_hosts(host: str) -> None:
    assert is_loopback_host(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.5", "example.com", "", None])
def test_hosts_that_are_not_loopback(host: str | None) -> None:
    assert not is_loopback_host(host)


def test_without_tokens_a_loopback_host_runs_open() -> None:
    auth = check_exposure(ApiTokens(), "127.0.0.1", {})
    assert not auth.required and auth.allows(None)


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", None])
def test_without_tokens_a_non_loopback_host_is_refused_saying_what_to_set(host: str | None) -> None:
    with pytest.raises(ConfigError) as raised:
        check_exposure(ApiTokens(), host, {})
    message = str(raised.value)
    assert "refusing to start the HTTP API without authentication on a non-loopback host" in message
    assert API_TOKENS_ENV in message and API_TOKEN_FILE_ENV in message and f"{API_AUTH_ENV}=disabled" in message


def test_the_operator_can_opt_out_explicitly() -> None:
    auth = check_exposure(ApiTokens(), "0.0.0.0", {API_AUTH_ENV: "disabled"})
    assert not auth.required and auth.allows(None)


def test_an_unknown_auth_mode_is_an_error() -> None:
    with pytest.raises(ConfigError, match=f"{API_AUTH_ENV}: 'off' is not one of required, disabled"):
        check_exposure(ApiTokens(), "127.0.0.1", {API_AUTH_ENV: "off"})


def test_configured_tokens_are_required_on_every_host_even_when_auth_is_disabled() -> None:
    for host, environ in (("127.0.0.1", {}), ("0.0.0.0", {}), ("0.0.0.0", {API_AUTH_ENV: "disabled"})):
        auth = check_exposure(ApiTokens([TOKEN]), host, environ)
        assert auth.required
        assert auth.allows(f"Bearer {TOKEN}")
        assert not auth.allows(None) and not auth.allows(f"Bearer {OTHER}") and not auth.allows(TOKEN)


def test_an_empty_token_file_counts_as_no_token(tmp_path: Path) -> None:
    token_file = tmp_path / "tokens"
    token_file.write_text("# no tokens yet\n")
    with pytest.raises(ConfigError, match="refusing to start"):
        check_exposure(ApiTokens(token_file=token_file), "0.0.0.0", {})
