"""A small signed JSON client shared by the platform and supplier HTTP adapters.

It only moves bytes and classifies what went wrong at the transport level; each adapter
decides what a status code means for its own calls.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
from aiohttp import hdrs
from yarl import URL

from agent import safejson
from agent.domain import Ambiguous, AuthFailed, BadResponse, Permanent, Transient
from agent.redact import register, safe_url
from agent.signing import auth_headers
from agent.storable import escaped

MAX_BODY_BYTES = 4 * 1024 * 1024
# One encoder for every request body: json.dumps with options builds a new one per call.
_ENCODER = json.JSONEncoder(ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    body: bytes
    retry_after: float | None

    def json(self) -> Any:
        """The body's JSON value, read by the bounded decoder (agent/safejson.py): a huge
        number or a bomb of nesting in one field is that field's problem, not a traceback."""
        try:
            return safejson.loads(self.body)
        except safejson.JsonError as exc:
            raise BadResponse(f"malformed JSON in HTTP {self.status} response: {exc}") from None

    def error_text(self) -> str:
        """`code: message` from the protocol's error envelope, shortened, for reasons and logs."""
        try:
            error = safejson.loads(self.body).get("error", {})
            text = f"{error.get('code', '?')}: {error.get('message', '')}"
        except (ValueError, UnicodeDecodeError, AttributeError):
            text = "unparseable error body"
        # It becomes a line's reason in the ledger: what no ledger stores is written escaped.
        return f"HTTP {self.status} {escaped(text[:200])}"


def quote_segment(value: str) -> str:
    """An order id or purchase id as one URL path segment."""
    return quote(value, safe="")


MAX_RETRY_AFTER = 3600.0


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` header, which RFC 9110 allows in two forms:
    delay-seconds (`120`) or an HTTP-date (`Wed, 21 Oct 2015 07:28:00 GMT`, measured from
    `now`, default the wall clock). Capped at an hour; None when absent or unreadable."""
    if value is None:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when.tzinfo is None:  # an HTTP-date is always GMT
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp() - (time.time() if now is None else now)
    if math.isnan(seconds):
        return None
    return max(0.0, min(seconds, MAX_RETRY_AFTER))


async def read_capped(resp: aiohttp.ClientResponse, limit: int = MAX_BODY_BYTES) -> bytes:
    """The body, refusing to buffer more than `limit` bytes of a hostile or broken peer.

    The limit is on the bytes as decoded: aiohttp inflates a gzip (deflate, br) body as it
    streams, so 1 MB on the wire with an honest Content-Length can still be a gigabyte, and
    the decoded bytes are counted as they come. Only a body nobody decodes (a Content-Length,
    no Content-Encoding, not chunked) is read whole: nearly every answer, read the cheapest way.
    """
    length = resp.content_length
    if length is not None and length > limit:
        raise _too_big(limit)
    headers = resp.headers
    if (
        length is not None
        and headers.get(hdrs.CONTENT_ENCODING, "identity").lower() == "identity"
        and hdrs.TRANSFER_ENCODING not in headers
    ):
        return await resp.read()  # nothing decoded: aiohttp reads exactly Content-Length bytes
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            raise _too_big(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_big(limit: int) -> BadResponse:
    # Built only when needed: every response of a flash sale passes through read_capped.
    return BadResponse(f"response body larger than {limit} bytes")


# The earlier private name, still imported by adapters written against it.
_read_capped = read_capped


class Redirected(Permanent):
    """The other side answered with a redirect. No client of ours follows one: it would carry
    the credentials, the signature and the body (card keys) to wherever it points."""


def redirect_refusal(resp: aiohttp.ClientResponse, who: str) -> str:
    """What a 3xx answer is reported as: where it pointed, secrets masked."""
    location = resp.headers.get(hdrs.LOCATION)
    if location:
        try:
            target = safe_url(resp.url.join(URL(location)))
        except ValueError:
            target = "(an unparseable location)"
    else:
        target = "(no Location header)"
    return (
        f"{who} answered HTTP {resp.status}, a redirect to {target}; redirects are never followed"
    )


class TransportErrors:
    """Maps aiohttp's transport failures inside `with TransportErrors(host, method, path):` to the
    classes the engine acts on: Transient when the request surely did not reach the server
    (no connection), else Ambiguous (it may have been acted on). The signed client, the REST
    client (Kinguin, OAuth) and WooCommerce's share it. A class, not a generator context
    manager, because every delivery call of a flash sale passes through it (0.25 us a call,
    against about 80 us for the call itself)."""

    __slots__ = ("host", "method", "path")

    def __init__(self, host: str | None, method: str, path: str) -> None:
        self.host = host
        self.method = method  # the call is named only when it failed: nothing built before
        self.path = path

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, _: object
    ) -> None:
        if exc is None:
            return
        if isinstance(exc, aiohttp.ClientConnectorError):
            raise Transient(f"cannot connect to {self.host}: {exc.os_error}") from None
        if isinstance(exc, TimeoutError):
            raise Ambiguous(f"{self.method} {self.path}: no response within the timeout") from None
        if isinstance(exc, aiohttp.ClientError):
            raise Ambiguous(
                f"{self.method} {self.path}: connection broke: {type(exc).__name__}"
            ) from None


DEFAULT_CONNECTIONS = 64


class SignedClient:
    def __init__(
        self,
        base_url: str,
        api_key: str,
        secret: str,
        timeout: float,
        max_connections: int = DEFAULT_CONNECTIONS,
    ) -> None:
        self._base = URL(base_url)
        self._base_text = str(self._base).rstrip("/")
        self._api_key = api_key
        self._secret = secret
        register(secret)  # never sent, but an error text must not show it either
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def _session_or_new(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # One pooled session per adapter: connection reuse matters under a burst.
            connector = aiohttp.TCPConnector(limit=self._max_connections, keepalive_timeout=30)
            self._session = aiohttp.ClientSession(
                timeout=self._timeout,
                connector=connector,
                cookie_jar=aiohttp.DummyCookieJar(),  # the protocols sign requests; no cookies
            )
        return self._session

    def url_for(self, path: str, params: Mapping[str, str | int] | None = None) -> URL:
        """`path` must already be percent-encoded (see `quote_segment`)."""
        query = f"?{urlencode(params)}" if params else ""
        return URL(f"{self._base_text}{path}{query}", encoded=True)

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str | int] | None = None,
        payload: Any = None,
        headers: Mapping[str, str] | None = None,
        read_timeout: float | None = None,
        unknown_outcome: bool = False,
    ) -> HttpResponse:
        """Raises Transient when the request surely did not reach the server, else Ambiguous;
        Redirected (Permanent) for a 3xx answer, which is never followed. `unknown_outcome`:
        the call changes something, so an answer too big to read is Ambiguous, not a
        BadResponse (which the engine may take for a call that did nothing)."""
        url = self.url_for(path, params)
        body = b"" if payload is None else _ENCODER.encode(payload).encode()
        signed = auth_headers(
            self._api_key, self._secret, time.time(), method, url.raw_path_qs, body
        )
        all_headers = {**signed, **(headers or {})}
        if payload is not None:
            all_headers["Content-Type"] = "application/json"
        session = self._session_or_new()
        with TransportErrors(self._base.host, method, path):
            # A long poll waits longer than an ordinary call may. (timeout=None would mean
            # "no timeout at all" to aiohttp, so the argument is only passed when set.)
            extra: dict[str, Any] = {}
            if read_timeout:
                extra["timeout"] = aiohttp.ClientTimeout(total=read_timeout)
            async with session.request(
                method,
                url,
                data=body or None,
                headers=all_headers,
                allow_redirects=False,
                **extra,
            ) as resp:
                if 300 <= resp.status < 400:
                    raise Redirected(redirect_refusal(resp, f"{self._base.host} ({method} {path})"))
                try:
                    data = await read_capped(resp)
                except BadResponse as exc:
                    if not unknown_outcome:
                        raise
                    # The server answered a call that changes something (a delivery, a
                    # purchase): it may have been done. Unread, it must be asked about, never
                    # taken for a refusal (a new purchase reference would buy twice).
                    raise Ambiguous(f"{method} {path}: {exc}") from None
                return HttpResponse(
                    resp.status, data, parse_retry_after(resp.headers.get("Retry-After"))
                )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def raise_for_status(resp: HttpResponse, who: str, *, unknown_outcome: bool) -> None:
    """Maps a non-2xx status to the error class the engine acts on (see raise_for_answer)."""
    if resp.status >= 300:
        raise_for_answer(
            resp.status, resp.error_text(), resp.retry_after, who, unknown_outcome=unknown_outcome
        )


def raise_for_answer(
    status: int,
    text: str,
    retry_after: float | None,
    who: str,
    what: str | None = None,
    *,
    unknown_outcome: bool,
    credentials: str = "our credentials",
) -> None:
    """A non-2xx answer as the error class the engine acts on, for every HTTP client of ours
    (the signed client, Kinguin's, WooCommerce's). `who` answered (`what` was asked, if
    named); `unknown_outcome`: the request changes something (a delivery, a purchase, a
    note), so a 5xx may come after the change was made: the caller must ask before acting
    again."""
    if status < 300:
        return
    where = f" ({what})" if what else ""
    if status in (401, 403):
        raise AuthFailed(f"{who} refused {credentials}{where}: {text}")
    if status == 429:
        raise Transient(f"{who} rate limit{where}: {text}", retry_after=retry_after)
    if status >= 500:
        if unknown_outcome:
            # 503 carries Retry-After: the question that must come first waits for it too.
            raise Ambiguous(f"{who} error, outcome unknown{where}: {text}", retry_after)
        raise Transient(f"{who} error{where}: {text}", retry_after=retry_after)
    raise Permanent(f"{who} rejected {what or 'the request'}: {text}")
