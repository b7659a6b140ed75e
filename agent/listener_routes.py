"""What a platform adapter hands the inbound listener (agent/listener.py): its routes, how each
is authenticated, and the jobs that go with them.

A platform module takes part by defining

    def listener_routes(platform: Platform, context: ListenerContext) -> Mount

(see agent/platforms/eneba.py, dujiao.py). The listener calls it once at start for every
configured platform whose module has it, and serves the routes of all of them. A route's
`auth.before_body` runs on the headers before a byte of the body is read (a bearer value, an
API key, a timestamp's window); `auth.after_body` runs on the body, read capped, before it is
parsed (an HMAC over it). Only then is `handle` called, with the body as bytes: the adapter
parses it, commits what it decides, and returns the reply, which the listener sends as it is.

Handlers commit before they reply: a reply sent is one the ledger already holds. A call
repeated for the same order and action is answered with the stored reply (the ledger's
`replies`, agent/store/ledger/responder.py), byte for byte.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

JSON = "application/json"


@dataclass(frozen=True, slots=True)
class Inbound:
    """One authenticated request, as a handler sees it."""

    method: str
    path: str  # the route's path as written on the wire, the listener's prefix removed
    params: Mapping[str, str]  # `{name}` segments of the route's path
    query: Mapping[str, str]
    headers: Mapping[str, str]
    body: bytes
    received_at: float  # wall clock


@dataclass(frozen=True, slots=True)
class Outbound:
    """A reply, and what the listener logs about it (never the body)."""

    status: int
    body: bytes = b""
    content_type: str = JSON
    order_id: str | None = None  # the platform's order id the call was about
    action: str | None = None
    outcome: str = "answered"  # answered | replayed | refused | failed


class Authenticator(Protocol):
    def before_body(
        self, method: str, path: str, headers: Mapping[str, str], now: float
    ) -> str | None:
        """None when the headers carry this platform's credentials (checked without reading
        the body), else the reason refused (a short word, logged; never a header's value)."""
        ...

    def after_body(
        self, method: str, path: str, headers: Mapping[str, str], body: bytes
    ) -> str | None:
        """None when the body is the one the credentials sign (or nothing signs it)."""
        ...

    def refusal(self, reason: str) -> Outbound:
        """What a refused request is answered with (the platform's own error envelope)."""
        ...


Handler = Callable[[Inbound], Awaitable[Outbound]]


@dataclass(frozen=True, slots=True)
class Route:
    platform: str
    method: str
    path: str  # segments; `{name}` matches one segment and is given in Inbound.params
    auth: Authenticator
    handle: Handler
    max_body: int | None = None  # None: the listener's max_body_bytes

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(self.path.strip("/").split("/"))


@dataclass(frozen=True, slots=True)
class Job:
    """Work a responder needs besides answering (releasing unpaid reservations, sending the
    callbacks it owes, reconciling): run every `interval` seconds on one agent at a time."""

    name: str
    interval: float
    run: Callable[[], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class Mount:
    routes: Sequence[Route] = ()
    jobs: Sequence[Job] = ()


@dataclass(frozen=True, slots=True)
class ListenerContext:
    """What a platform's routes work with: the ledger (its responder methods,
    agent/store/ledger/responder.py) and the clock."""

    store: Any
    clock: Callable[[], float]
    extra: Mapping[str, Any] = field(default_factory=dict)


# --- authenticators ---------------------------------------------------------------------------
def same(a: str, b: str) -> bool:
    """Constant-time equality of two header values (bytes as sent, surrogates kept)."""
    return hmac.compare_digest(
        a.encode("utf-8", "surrogateescape"), b.encode("utf-8", "surrogateescape")
    )


class BearerAuth:
    """`Authorization: Bearer <value>`, the value the merchant registered with the platform
    (Eneba's API callbacks). Nothing signs the body."""

    def __init__(self, value: str, refuse: Callable[[str], Outbound]) -> None:
        self._expected = f"Bearer {value}"
        self._refuse = refuse

    def before_body(
        self, method: str, path: str, headers: Mapping[str, str], now: float
    ) -> str | None:
        got = headers.get("Authorization")
        if got is None:
            return "no_authorization"
        return None if same(got, self._expected) else "wrong_token"

    def after_body(
        self, method: str, path: str, headers: Mapping[str, str], body: bytes
    ) -> str | None:
        return None

    def refusal(self, reason: str) -> Outbound:
        return self._refuse(reason)


def hmac_sha256_hex(secret: str, method: str, path: str, timestamp: str, body: bytes) -> str:
    """dujiao-next's signature: hex HMAC-SHA256(secret, METHOD\\nPATH\\nTS\\nmd5(body))."""
    text = f"{method}\n{path}\n{timestamp}\n{hashlib.md5(body).hexdigest()}"
    return hmac.new(secret.encode(), text.encode(), hashlib.sha256).hexdigest()


class SignedHeadersAuth:
    """An API key, a Unix timestamp within `skew` seconds and an HMAC of the method, path,
    timestamp and body's MD5 in three headers (dujiao-next's `Dujiao-Next-*`). The key and
    the timestamp are checked before the body is read; the signature over it after."""

    def __init__(
        self,
        api_key: str,
        secret: str,
        headers: tuple[str, str, str],
        skew: float,
        refuse: Callable[[str], Outbound],
        *,
        strip: str = "",
    ) -> None:
        self._strip = strip  # a prefix of ours the caller's signed path does not have
        self._api_key = api_key
        self._secret = secret
        self._key_header, self._ts_header, self._sig_header = headers
        self._skew = skew
        self._refuse = refuse

    def before_body(
        self, method: str, path: str, headers: Mapping[str, str], now: float
    ) -> str | None:
        key = headers.get(self._key_header)
        stamp = headers.get(self._ts_header)
        signature = headers.get(self._sig_header)
        if not key or not stamp or not signature:
            return "missing_auth_headers"
        if not same(key, self._api_key):
            return "invalid_api_key"
        if not (stamp.isascii() and stamp.isdigit() and len(stamp) <= 12):
            return "invalid_timestamp"
        if abs(now - int(stamp)) > self._skew:
            return "timestamp_expired"
        return None

    def after_body(
        self, method: str, path: str, headers: Mapping[str, str], body: bytes
    ) -> str | None:
        stamp = headers[self._ts_header]
        if self._strip and path.startswith(self._strip + "/"):
            path = path[len(self._strip) :]
        expected = hmac_sha256_hex(self._secret, method, path, stamp, body)
        return None if same(headers[self._sig_header].lower(), expected) else "invalid_signature"

    def refusal(self, reason: str) -> Outbound:
        return self._refuse(reason)
