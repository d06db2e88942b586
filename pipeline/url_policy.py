"""Which camera URLs ferstream hands to FFmpeg, and which FFmpeg protocols each may use.

FFmpeg reads far more than cameras: ``tcp:host:port``, ``pipe:3``, ``concat:a|b``, ``subfile,,...:``,
``ftp:`` and dozens of other protocols, chosen by a ``name:`` prefix of the "file name". A URL that
reaches ``av.open`` unchecked can therefore talk to any TCP service the pod can reach, read any local
file and echo what it found through ``last_error``. The policy here closes that at two levels:

1. ``check_source_url`` accepts explicit ``rtsp``, ``rtsps``, ``http``, ``https`` and ``file`` URLs only.
   A bare path is accepted from operator-written configs (YAML, the CLI), never from the HTTP API,
   and never when FFmpeg would read a protocol prefix in it. Hosts are parsed strictly (one ``@``, a
   valid port, a well-formed IP literal), numeric hosts in every form ``inet_aton`` reads
   (``2852039166``, ``0xa9.0xfe.0xa9.0xfe``) are decoded first, and link-local and cloud metadata
   addresses are refused unless the operator opts in: they serve instance credentials. Private
   ranges stay allowed, since that is where cameras live. Through the API a file source must be a
   ``file://`` URL whose resolved path lies inside one of ``allowed_file_dirs``.
2. ``protocol_whitelist`` gives FFmpeg's own ``protocol_whitelist`` option for each scheme, so even a
   URL that got past (1), or a nested open (an HLS segment, an RTSP data channel), cannot reach
   another protocol.

Host names are checked as written, not resolved: a DNS name that resolves to a metadata address is
stopped only by the egress NetworkPolicy (k8s/base/networkpolicies.yaml). SECURITY.md says so.

Showing a URL is the other half of URL handling, and lives here too: ``redact_url``, ``url_secrets``
and ``scrub_credentials`` keep the passwords and tokens camera URLs often carry out of logs, API
responses, statuses and errors.

Ray-free and PyAV-free: the config, the API and the decode thread all use it.
"""

from __future__ import annotations

import enum
import ipaddress
import os
import re
import socket
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path

ALLOWED_SCHEMES = ("rtsp", "rtsps", "http", "https", "file")
NETWORK_SCHEMES = frozenset({"rtsp", "rtsps", "http", "https"})
MAX_URL_LENGTH = 2048

# FFmpeg's protocol_whitelist per scheme: the protocols the top-level open and every nested open
# (RTSP's RTP/UDP channels, TLS under rtsps/https, HLS playlists, segments and AES keys) may use.
PROTOCOL_WHITELISTS: dict[str, str] = {
    "rtsp": "rtsp,rtp,udp,tcp",
    "rtsps": "rtsps,rtsp,rtp,udp,tcp,tls",
    # An HTTP source may redirect to HTTPS and an HLS playlist may list HTTPS segments (or AES keys via crypto).
    "http": "http,https,tcp,tls,crypto",
    "https": "http,https,tcp,tls,crypto",
    "file": "file",
}

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# Whitespace and control characters would end up in RTSP/HTTP request lines (header injection).
_FORBIDDEN_CHARACTERS = re.compile(r"[\x00-\x20\x7f\\]")
_HOST_NAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62})(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62}))*$")
# What inet_aton (and so getaddrinfo, which FFmpeg calls) reads as an IPv4 address: 1-4 parts,
# each decimal, octal (leading 0) or hex (0x).
_NUMERIC_HOST = re.compile(r"^(?:0[xX][0-9A-Fa-f]*|[0-9]+)(?:\.(?:0[xX][0-9A-Fa-f]*|[0-9]+)){0,3}$")

# Cloud instance metadata services: they hand out credentials to whoever asks from the instance.
METADATA_HOST_NAMES = frozenset({"metadata.google.internal", "metadata.goog", "metadata", "instance-data", "instance-data.ec2.internal"})
METADATA_NETWORKS = (
    ipaddress.ip_network("169.254.0.0/16"),  # IPv4 link-local: AWS, GCP, Azure, OpenStack metadata at 169.254.169.254
    ipaddress.ip_network("fe80::/10"),  # IPv6 link-local
    ipaddress.ip_network("100.100.100.200/32"),  # Alibaba Cloud metadata
    ipaddress.ip_network("fd00:ec2::254/128"),  # AWS metadata over IPv6
)
# IPv6 forms that carry an IPv4 address a connection may end up at.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")

# Kernel interfaces, not videos: never a camera, whoever configured it.
_SYSTEM_DIRS = (Path("/proc"), Path("/sys"), Path("/dev"))


class UrlOrigin(str, enum.Enum):
    """Who wrote the URL: the operator (a YAML config, the CLI) or an API client."""

    CONFIG = "config"
    API = "api"


class UrlRefused(ValueError):
    """The URL is not allowed; the message says why without repeating the URL (it may hold credentials)."""


def url_scheme(url: str) -> str:
    """The scheme of a source URL, lower case; a URL without ``scheme://`` (a bare path) counts as ``file``."""
    match = _SCHEME.match(url)
    return match.group(1).lower() if match else "file"


def has_explicit_scheme(url: str) -> bool:
    return _SCHEME.match(url) is not None


def local_path(url: str) -> str:
    """A file source's filesystem path: bare paths as they are, ``file://`` URLs decoded."""
    if url_scheme(url) != "file" or "://" not in url:
        return url
    parsed = urllib.parse.urlparse(url)
    return urllib.request.url2pathname(parsed.netloc + parsed.path)


def protocol_whitelist(url: str) -> str:
    """FFmpeg's ``protocol_whitelist`` for this URL's scheme (bare paths: ``file``)."""
    return PROTOCOL_WHITELISTS[url_scheme(url)]


def host_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP address a host denotes as FFmpeg's resolver would read it, None for a DNS name.

    Raises UrlRefused for a host that looks numeric but is no address (``999.1.1.1``)."""
    if ":" in host:
        try:
            return ipaddress.IPv6Address(host)
        except ValueError:
            raise UrlRefused("the host is not a valid IPv6 address") from None
    if _NUMERIC_HOST.match(host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            raise UrlRefused("the host looks numeric but is not a valid IPv4 address") from None
    return None


def is_link_local_or_metadata(host: str) -> bool:
    """True for link-local addresses and cloud metadata endpoints, in any spelling of the address."""
    name = host.rstrip(".").lower()
    if name in METADATA_HOST_NAMES:
        return True
    address = host_address(name)
    if address is None:
        return False
    candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [address]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            candidates.append(address.ipv4_mapped)
        if address in _NAT64:
            candidates.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return any(candidate in network for candidate in candidates for network in METADATA_NETWORKS if candidate.version == network.version)


def _check_characters(url: str) -> None:
    if len(url) > MAX_URL_LENGTH:
        raise UrlRefused(f"longer than {MAX_URL_LENGTH} characters")
    if _FORBIDDEN_CHARACTERS.search(url):
        raise UrlRefused("contains whitespace, a control character or a backslash")


def _check_bare_path(url: str) -> None:
    # FFmpeg takes "name:" (and "subfile,...:") at the start of a file name as a protocol:
    # tcp:, pipe:, concat:, ftp:, file:, data:, ... A colon in the first path segment is refused.
    first_segment = url.split("/", 1)[0]
    if ":" in first_segment:
        raise UrlRefused("a path without scheme:// must not start with an FFmpeg protocol prefix (name:); write file:///... instead")


def _check_network_url(url: str, allow_link_local: bool) -> None:
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port  # parsing it raises ValueError for a non-numeric or out-of-range port
    except ValueError:
        # Not urllib's message: it quotes the text it took for a port, which can be part of a password.
        raise UrlRefused("malformed URL: brackets that hold no IPv6 address, or a port that is not a number from 0 to 65535") from None
    if parts.netloc.count("@") > 1:
        # Python splits user info at the last @, some URL parsers at the first: one host, not two.
        raise UrlRefused("more than one '@' in the address; percent-encode '@' in user names and passwords")
    hostname = parts.hostname
    if not hostname:
        raise UrlRefused("no host")
    if port == 0:
        raise UrlRefused("port 0")
    if "[" in parts.netloc:
        host_address(hostname.split("%", 1)[0])  # a bracketed host must be an IPv6 literal
    elif not _HOST_NAME.match(hostname.rstrip(".")):
        raise UrlRefused("the host is not a valid host name or IP address")
    else:
        host_address(hostname.rstrip("."))  # refuses numeric-looking hosts that are no address
    if not allow_link_local and is_link_local_or_metadata(hostname.split("%", 1)[0]):
        raise UrlRefused(
            "link-local and cloud metadata addresses are refused (url_policy.allow_link_local: true allows link-local cameras)"
        )


def _check_file(url: str, origin: UrlOrigin, allowed_file_dirs: Sequence[Path]) -> None:
    if has_explicit_scheme(url):
        netloc = urllib.parse.urlsplit(url).netloc
        if netloc not in ("", "localhost"):
            raise UrlRefused("a file:// URL names no host other than localhost (file:///path)")
    elif origin == UrlOrigin.API:
        raise UrlRefused("the API takes explicit URLs only: rtsp://, rtsps://, http://, https:// or file:///path")
    else:
        _check_bare_path(url)
    resolved = Path(os.path.realpath(local_path(url)))
    if any(resolved.is_relative_to(system) for system in _SYSTEM_DIRS):
        raise UrlRefused("files under /proc, /sys and /dev are refused")
    if origin == UrlOrigin.API:
        if not allowed_file_dirs:
            raise UrlRefused("file sources are off in the API (set url_policy.allowed_file_dirs to allow some directories)")
        if not any(resolved.is_relative_to(os.path.realpath(directory)) for directory in allowed_file_dirs):
            raise UrlRefused("the file is not inside url_policy.allowed_file_dirs (after resolving links and '..')")


def check_source_url(
    url: str,
    origin: UrlOrigin,
    *,
    allow_link_local: bool = False,
    allowed_file_dirs: Sequence[Path] = (),
) -> str:
    """Return ``url`` if ferstream may open it, else raise UrlRefused saying why."""
    _check_characters(url)
    scheme = url_scheme(url)
    if scheme not in ALLOWED_SCHEMES:
        raise UrlRefused(f"unsupported URL scheme {scheme!r}; use one of {', '.join(ALLOWED_SCHEMES)}")
    if scheme in NETWORK_SCHEMES:
        _check_network_url(url, allow_link_local)
    else:
        _check_file(url, origin, allowed_file_dirs)
    return url


# -- showing URLs without their credentials ---------------------------------------------------

# Query parameters whose values are credentials in camera and CDN URLs (?pwd=, ?token=, signed URLs).
# A parameter is secret when its name, lower-cased, is one of these or contains one of SECRET_QUERY_PARTS.
SECRET_QUERY_NAMES = frozenset(
    {"pass", "pwd", "passwd", "password", "token", "key", "secret", "auth", "signature", "sig", "credential", "credentials", "session"}
)
SECRET_QUERY_PARTS = ("password", "passwd", "token", "secret", "signature", "apikey", "api_key", "access_key", "auth", "credential")
REDACTED = "***"
UNPARSABLE_URL = "<unparsable URL>"


def is_secret_query_parameter(name: str) -> bool:
    lowered = name.lower()
    return lowered in SECRET_QUERY_NAMES or any(part in lowered for part in SECRET_QUERY_PARTS)


def _redact_query(query: str) -> str:
    if not query:
        return query
    parts = []
    for pair in query.split("&"):
        name, equals, _value = pair.partition("=")
        parts.append(f"{name}={REDACTED}" if equals and is_secret_query_parameter(urllib.parse.unquote_plus(name)) else pair)
    return "&".join(parts)


def redact_url(url: str) -> str:
    """The URL without credentials, for logs, API responses and errors (camera URLs often carry them):
    the password in the user info and the values of secret-looking query parameters become ``***``.
    Never raises: a URL that does not parse is replaced as a whole rather than shown."""
    try:
        parsed = urllib.parse.urlsplit(url)
    except ValueError:
        return UNPARSABLE_URL
    netloc = parsed.netloc
    userinfo, at, host = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.split(':', 1)[0]}:{REDACTED}@{host}"
    elif at:
        # User info without a password is often a token in the user's place (https://<token>@host/).
        netloc = f"{REDACTED}@{host}"
    return urllib.parse.urlunsplit(parsed._replace(netloc=netloc, query=_redact_query(parsed.query)))


def url_secrets(url: str) -> list[str]:
    """The credential parts of a URL as they may appear in text: the password (or a user part
    without one), the values of secret-looking query parameters, each raw and decoded."""
    try:
        parsed = urllib.parse.urlsplit(url)
    except ValueError:
        return [url]  # no parts to tell apart: the whole URL is the secret
    secrets: list[str] = []
    userinfo, at, _host = parsed.netloc.rpartition("@")
    if at:
        user, colon, password = userinfo.partition(":")
        secrets.append(password if colon else user)
    for pair in parsed.query.split("&"):
        name, equals, value = pair.partition("=")
        if equals and is_secret_query_parameter(urllib.parse.unquote_plus(name)):
            secrets.append(value)
    decoded = [urllib.parse.unquote_plus(secret) for secret in secrets]
    return sorted({secret for secret in (*secrets, *decoded) if secret}, key=len, reverse=True)


def scrub_credentials(text: str, url: str) -> str:
    """``text`` (an error message, a status) with ``url`` shown redacted and every credential in it
    replaced by ``***``, wherever a library may have quoted it."""
    scrubbed = text.replace(url, redact_url(url)) if url else text
    for secret in url_secrets(url):
        scrubbed = scrubbed.replace(secret, REDACTED)
    return scrubbed
