"""The source URL policy: every bypass from issue 11, each spelling of a metadata address, the
FFmpeg protocol whitelist per scheme, and URLs shown without their credentials."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import ConfigError, PipelineConfig, SourceConfig, UrlPolicyConfig, parse_config
from pipeline.url_policy import (
    MAX_URL_LENGTH,
    UrlOrigin,
    UrlRefused,
    check_source_url,
    is_link_local_or_metadata,
    local_path,
    protocol_whitelist,
    redact_url,
    scrub_credentials,
    url_secrets,
)

BOTH_ORIGINS = pytest.mark.parametrize("origin", list(UrlOrigin))


@BOTH_ORIGINS
@pytest.mark.parametrize(
    ("url", "reason"),
    [
        # The bypasses the issue reproduced: FFmpeg protocol prefixes without "://".
        ("tcp:10.0.0.5:6379", "protocol prefix"),
        ("pipe:3", "protocol prefix"),
        ("concat:/etc/hosts|/etc/passwd", "protocol prefix"),
        ("ftp:host/x", "protocol prefix"),
        ("file:/etc/passwd", "protocol prefix"),
        ("subfile,,start,0,end,0,,:/etc/passwd", "protocol prefix"),
        ("data:text/plain;base64,AAAA", "protocol prefix"),
        ("file:///proc/self/environ", "/proc"),
        ("/proc/self/environ", "/proc"),
        ("file:///dev/stdin", "/proc, /sys and /dev"),
        ("http://169.254.169.254/", "link-local"),
        # Other schemes.
        ("ftp://host/video", "unsupported URL scheme"),
        ("gopher://host/", "unsupported URL scheme"),
        ("udp://0.0.0.0:1234", "unsupported URL scheme"),
        ("rtmp://host/live", "unsupported URL scheme"),
    ],
)
def test_the_issues_bypasses_are_refused(url: str, reason: str, origin: UrlOrigin) -> None:
    # Through the API a path without scheme:// is refused before its prefix is looked at.
    expected = f"{reason}|explicit URLs only" if origin == UrlOrigin.API else reason
    with pytest.raises(UrlRefused, match=expected):
        check_source_url(url, origin, allowed_file_dirs=[Path("/")])


@pytest.mark.parametrize(
    "host",
    [
        "169.254.169.254",
        "169.254.169.254.",  # trailing dot
        "2852039166",  # 169.254.169.254 as one decimal number
        "0xa9fea9fe",  # ... as hex
        "0xa9.0xfe.0xa9.0xfe",
        "0251.0376.0251.0376",  # octal
        "169.254.43518",  # inet_aton's a.b.c form
        "[::ffff:169.254.169.254]",  # IPv4-mapped IPv6
        "[::ffff:a9fe:a9fe]",
        "[64:ff9b::a9fe:a9fe]",  # NAT64
        "[fe80::1]",
        "[fe80::1%25eth0]",  # with a zone id
        "[fd00:ec2::254]",  # AWS metadata over IPv6
        "100.100.100.200",  # Alibaba Cloud metadata
        "metadata.google.internal",
        "METADATA.google.internal.",
    ],
)
def test_link_local_and_metadata_addresses_are_refused_in_every_spelling(host: str) -> None:
    with pytest.raises(UrlRefused, match="link-local"):
        check_source_url(f"http://{host}/computeMetadata/v1/", UrlOrigin.API)
    with pytest.raises(UrlRefused, match="link-local"):
        check_source_url(f"rtsp://user:pw@{host}:554/stream", UrlOrigin.CONFIG)


def test_link_local_cameras_are_allowed_with_the_opt_in() -> None:
    assert check_source_url("rtsp://169.254.10.20/stream", UrlOrigin.API, allow_link_local=True)
    policy = UrlPolicyConfig(allow_link_local=True)
    assert policy.check("rtsp://[fe80::1]/s", UrlOrigin.API) == "rtsp://[fe80::1]/s"


@pytest.mark.parametrize(
    "url",
    [
        "rtsp://10.0.0.5:554/h264",
        "rtsp://admin:secret@192.168.1.64/Streaming/Channels/101",
        "rtsps://172.16.0.9:322/s",
        "rtsp://camera-lobby.example.internal:554/stream1",
        "rtsp://127.0.0.1:8554/live",
        "http://[fd12:3456::1]:8080/live.m3u8",
        "https://cdn.example.com/live/index.m3u8?token=abc",
        "http://100.64.0.7/video",  # carrier-grade NAT is not a metadata address
        "rtsp://cam_1.local/s",
    ],
)
def test_private_ranges_and_ordinary_hosts_are_allowed(url: str) -> None:
    assert check_source_url(url, UrlOrigin.API) == url


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("rtsp://[bad/x", "malformed URL"),
        ("rtsp://[::1/x", "malformed URL"),
        ("rtsp://[not-an-ip]/x", "IPv6"),
        ("rtsp://host:99999/x", "malformed URL"),
        ("rtsp://host:port/x", "malformed URL"),
        ("rtsp://user:sec/ret@host/x", "malformed URL"),  # the "port" urllib sees is part of the password
        ("rtsp://host:0/x", "port 0"),
        ("rtsp:///stream", "no host"),
        ("http://a@169.254.169.254@example.com/", "more than one '@'"),
        ("rtsp://bad host/x", "whitespace"),
        ("http://host/x\r\nInjected: 1", "control character"),
        ("rtsp://host\\@evil/x", "backslash"),
        ("rtsp://999.1.1.1/x", "not a valid IPv4 address"),
        ("rtsp://-host/x", "not a valid host name"),
        ("rtsp://ho$t/x", "not a valid host name"),
    ],
)
def test_hosts_are_parsed_strictly(url: str, reason: str) -> None:
    with pytest.raises(UrlRefused, match=reason):
        check_source_url(url, UrlOrigin.CONFIG)


def test_length_is_limited() -> None:
    url = "rtsp://cam/" + "a" * (MAX_URL_LENGTH - len("rtsp://cam/"))
    assert check_source_url(url, UrlOrigin.API) == url
    with pytest.raises(UrlRefused, match=f"longer than {MAX_URL_LENGTH}"):
        check_source_url(url + "a", UrlOrigin.API)
    with pytest.raises(UrlRefused, match="longer than"):
        check_source_url("rtsp://cam/" + "a" * 50_000_000, UrlOrigin.API)


def test_bare_paths_come_from_configs_only(tmp_path: Path) -> None:
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"")
    assert check_source_url(str(clip), UrlOrigin.CONFIG) == str(clip)
    assert check_source_url("videos/a:b.mp4", UrlOrigin.CONFIG)  # a colon after the first "/" is no prefix
    with pytest.raises(UrlRefused, match="explicit URLs only"):
        check_source_url(str(clip), UrlOrigin.API, allowed_file_dirs=[tmp_path])


def test_api_file_sources_need_allowed_file_dirs_and_stay_inside_them(tmp_path: Path) -> None:
    allowed = tmp_path / "videos"
    allowed.mkdir()
    clip = allowed / "clip.mp4"
    clip.write_bytes(b"")
    outside = tmp_path / "secret.mp4"
    outside.write_bytes(b"")
    (allowed / "link.mp4").symlink_to(outside)

    with pytest.raises(UrlRefused, match="file sources are off in the API"):
        check_source_url(f"file://{clip}", UrlOrigin.API)
    assert check_source_url(f"file://{clip}", UrlOrigin.API, allowed_file_dirs=[allowed])
    for escape in (f"file://{allowed}/../secret.mp4", f"file://{allowed}/link.mp4", f"file://{outside}"):
        with pytest.raises(UrlRefused, match="not inside url_policy.allowed_file_dirs"):
            check_source_url(escape, UrlOrigin.API, allowed_file_dirs=[allowed])
    # A directory whose name starts like the allowed one is not inside it.
    sibling = tmp_path / "videos2"
    sibling.mkdir()
    (sibling / "x.mp4").write_bytes(b"")
    with pytest.raises(UrlRefused, match="not inside"):
        check_source_url(f"file://{sibling}/x.mp4", UrlOrigin.API, allowed_file_dirs=[allowed])


def test_file_urls_name_no_remote_host(tmp_path: Path) -> None:
    with pytest.raises(UrlRefused, match="no host other than localhost"):
        check_source_url("file://fileserver/share/a.mp4", UrlOrigin.CONFIG)
    assert check_source_url(f"file://localhost{tmp_path}/a.mp4", UrlOrigin.CONFIG)


@pytest.mark.parametrize(
    ("url", "whitelist"),
    [
        ("rtsp://cam/s", "rtsp,rtp,udp,tcp"),
        ("RTSPS://cam/s", "rtsps,rtsp,rtp,udp,tcp,tls"),
        ("http://h/live.m3u8", "http,https,tcp,tls,crypto"),
        ("https://h/live.m3u8", "http,https,tcp,tls,crypto"),
        ("file:///videos/a.mp4", "file"),
        ("/videos/a.mp4", "file"),
    ],
)
def test_protocol_whitelist_per_scheme(url: str, whitelist: str) -> None:
    assert protocol_whitelist(url) == whitelist
    for dangerous in ("concat", "pipe", "ftp", "subfile", "data", "unix", "gopher", "fd"):
        assert dangerous not in whitelist.split(",")


def test_is_link_local_or_metadata_leaves_other_hosts_alone() -> None:
    for host in ("10.0.0.1", "127.0.0.1", "192.168.0.1", "camera.example.com", "::1", "fd12::1"):
        assert not is_link_local_or_metadata(host)


def test_local_path_decodes_file_urls() -> None:
    assert local_path("file:///videos/a%20b.mp4") == "/videos/a b.mp4"
    assert local_path("/videos/a.mp4") == "/videos/a.mp4"


# -- the policy in the config ----------------------------------------------------------------------


def test_source_config_refuses_the_bypasses_with_the_url_field_named() -> None:
    for url in ("tcp:10.0.0.5:6379", "pipe:3", "concat:/etc/hosts|/etc/passwd", "ftp:host/x", "file:///proc/self/environ", "rtsp://[bad/x"):
        with pytest.raises(ConfigError, match="^camera: url: "):
            parse_config(SourceConfig, {"camera_id": "c", "url": url}, "camera")


def test_pipeline_config_applies_the_link_local_policy_to_its_cameras() -> None:
    cameras = [{"camera_id": "ok", "url": "rtsp://10.0.0.5/s"}, {"camera_id": "meta", "url": "http://169.254.169.254/"}]
    with pytest.raises(ConfigError, match=r"cameras: .*1\.url \(camera 'meta'\): link-local"):
        parse_config(PipelineConfig, {"cameras": cameras}, "pipeline.yaml")
    allowed = parse_config(PipelineConfig, {"url_policy": {"allow_link_local": True}, "cameras": cameras}, "pipeline.yaml")
    assert [camera.camera_id for camera in allowed.cameras] == ["ok", "meta"]


def test_config_bare_paths_need_no_allowed_file_dirs(tmp_path: Path) -> None:
    config = parse_config(PipelineConfig, {"cameras": [{"camera_id": "f", "url": str(tmp_path / "a.mp4")}]}, "pipeline.yaml")
    assert config.url_policy.allowed_file_dirs == ()


# -- showing URLs without their credentials ---------------------------------------------------


def test_redact_url_hides_passwords():
    assert redact_url("rtsp://admin:secret@10.0.0.5:554/h264") == "rtsp://admin:***@10.0.0.5:554/h264"
    assert redact_url("rtsp://10.0.0.5/h264") == "rtsp://10.0.0.5/h264"
    assert redact_url("rtsps://u:p@[fe80::1]:322/s") == "rtsps://u:***@[fe80::1]:322/s"
    assert redact_url("/videos/a.mp4") == "/videos/a.mp4"


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("rtsp://10.0.0.5/h264?pwd=hunter2", "rtsp://10.0.0.5/h264?pwd=***"),
        ("rtsp://10.0.0.5/live?user=admin&PASSWORD=x&channel=1", "rtsp://10.0.0.5/live?user=admin&PASSWORD=***&channel=1"),
        ("https://cdn/x.m3u8?token=abc&Signature=s&Key-Pair-Id=k", "https://cdn/x.m3u8?token=***&Signature=***&Key-Pair-Id=k"),
        (
            "https://cdn/x.m3u8?X-Amz-Signature=s&X-Amz-Credential=c&X-Amz-Date=d",
            "https://cdn/x.m3u8?X-Amz-Signature=***&X-Amz-Credential=***&X-Amz-Date=d",
        ),
        (
            "http://h/v?sig=1&auth=2&pass=3&secret=4&key=5&api_key=6&access_token=7",
            "http://h/v?sig=***&auth=***&pass=***&secret=***&key=***&api_key=***&access_token=***",
        ),
        ("rtsp://u:p@h/s?Pwd=x", "rtsp://u:***@h/s?Pwd=***"),
        ("rtsp://h/s?pass%77ord=x", "rtsp://h/s?pass%77ord=***"),  # percent-encoded names too
        ("rtsp://h/s?flag&fps=5", "rtsp://h/s?flag&fps=5"),
    ],
)
def test_redact_url_hides_secret_query_parameters(url, redacted):
    assert redact_url(url) == redacted


def test_redact_url_hides_a_user_part_without_a_password():
    # https://<token>@host/ puts a credential where a user name goes.
    assert redact_url("https://ghp_0123456789abcdef@cdn.example/live.m3u8") == "https://***@cdn.example/live.m3u8"


def test_url_secrets_and_scrub_credentials():
    url = "rtsp://admin:p%40ss@10.0.0.5/live?channel=1&token=abc%2Fdef"
    assert url_secrets(url) == ["abc%2Fdef", "abc/def", "p%40ss", "p@ss"]
    message = f"open failed for {url}; server said: bad password p@ss, token abc/def; channel=1"
    scrubbed = scrub_credentials(message, url)
    assert "p@ss" not in scrubbed and "p%40ss" not in scrubbed and "abc/def" not in scrubbed and "abc%2Fdef" not in scrubbed
    assert "rtsp://admin:***@10.0.0.5/live?channel=1&token=***" in scrubbed and "channel=1" in scrubbed
    assert scrub_credentials("no answer within 3s", "rtsp://10.0.0.5/live") == "no answer within 3s"
    assert scrub_credentials("x rtsp://u:pw@[bad/x y", "rtsp://u:pw@[bad/x") == "x <unparsable URL> y"


def test_redact_url_never_raises_on_a_malformed_url():
    assert redact_url("rtsp://admin:secret@[bad/x") == "<unparsable URL>"
