"""The [listener] table: the inbound HTTP listener for responder platforms, off by default.

Parsed through agent.config.Section, so a bad value is one ConfigError naming the file and the
key, like every other table.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from agent.config import Section

DEFAULT_LISTENER_PORT = 8791


@dataclass(frozen=True, slots=True)
class ListenerSettings:
    host: str = "127.0.0.1"
    port: int = DEFAULT_LISTENER_PORT
    # A request's body may be at most this long (platform callbacks are a few kilobytes).
    max_body_bytes: int = 64 * 1024
    # Time allowed for a request's headers to arrive (and for the next request's on a
    # connection kept open), and for its body: a client trickling bytes (slowloris) is cut off.
    header_timeout: float = 10.0
    body_timeout: float = 10.0
    # Connections open at once; more are closed as they come.
    max_connections: int = 256
    # Prefix every route's path with this (a reverse proxy forwarding /kami/... as is).
    path_prefix: str = ""


def parse_listener(top: Section) -> ListenerSettings | None:
    """[listener], or None when absent or `enabled = false`."""
    if "listener" not in top.data:
        return None
    s = Section(top.source, "listener", top.table("listener"), top._)
    enabled = s.boolean("enabled", True)
    host = s.string("host", "127.0.0.1")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise s.error("host", f"must be an IP address to listen on, got {host!r}") from None
    prefix = s.string("path_prefix", "/").rstrip("/")
    if prefix and (not prefix.startswith("/") or "?" in prefix or "#" in prefix):
        raise s.error("path_prefix", f"must be a path starting with /, got {prefix!r}")
    settings = ListenerSettings(
        host=host,
        port=s.integer("port", DEFAULT_LISTENER_PORT, minimum=1, maximum=65535),
        max_body_bytes=s.integer(
            "max_body_bytes", 64 * 1024, minimum=1024, maximum=16 * 1024 * 1024, unit="bytes"
        ),
        header_timeout=s.number("header_timeout", 10.0, minimum=0.05, maximum=300, unit="seconds"),
        body_timeout=s.number("body_timeout", 10.0, minimum=0.05, maximum=300, unit="seconds"),
        max_connections=s.integer(
            "max_connections", 256, minimum=1, maximum=100_000, unit="connections"
        ),
        path_prefix=prefix,
    )
    s.reject_unknown()
    return settings if enabled else None
