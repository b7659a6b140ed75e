"""A plain JSON-over-HTTPS client for platforms that authenticate with a header of their own
(a bearer token) rather than our request signatures.

It only moves bytes and classifies transport failures; each adapter decides what a status
code means for its calls. Redirects are never followed (a 3xx comes back as a Reply with its
Location, for the adapter to refuse), bodies are read through the capped reader, and JSON is
parsed with its size already bounded and nesting errors caught.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import aiohttp
from yarl import URL

from agent import safejson
from agent.domain import BadResponse
from agent.signed_http import TransportErrors, parse_retry_after, read_capped

_ENCODER = json.JSONEncoder(ensure_ascii=False)
MAX_MESSAGE = 200


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: bytes
    retry_after: float | None
    location: str | None = None

    def json(self) -> Any:
        try:
            return safejson.loads(self.body)  # bounded: no RecursionError, no digit limit
        except safejson.JsonError:
            raise BadResponse(f"malformed JSON in HTTP {self.status} response") from None

    def message(self) -> str:
        """The error text of the body (Spring's `message`, or `detail` / `error`), shortened,
        for reasons and logs; the status alone when there is none."""
        try:
            body = self.json()
        except BadResponse:
            body = None
        text = ""
        if isinstance(body, dict):
            for key in ("message", "detail", "error_description", "error"):
                value = body.get(key)
                if isinstance(value, str) and value:
                    text = value
                    break
        text = " ".join(text.split())[:MAX_MESSAGE]
        return f"HTTP {self.status} {text}".rstrip()


class RestClient:
    def __init__(self, timeout: float, max_connections: int) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def _session_or_new(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self._max_connections, keepalive_timeout=30)
            self._session = aiohttp.ClientSession(
                timeout=self._timeout,
                connector=connector,
                cookie_jar=aiohttp.DummyCookieJar(),  # bearer tokens only; no cookies
            )
        return self._session

    async def request(
        self,
        method: str,
        url: str,
        *,
        params: Mapping[str, str | int] | None = None,
        json_body: Any = None,
        form: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        """Raises Transient when the request surely did not reach the server, else Ambiguous.
        `url` must already be percent-encoded; it is never logged here (callers name the call
        without any credential)."""
        query = f"?{urlencode(params)}" if params else ""
        target = URL(f"{url}{query}", encoded=True)
        all_headers = dict(headers or {})
        data: bytes | None = None
        if json_body is not None:
            data = _ENCODER.encode(json_body).encode()
            all_headers["Content-Type"] = "application/json"
        elif form is not None:
            data = urlencode(form).encode()
            all_headers["Content-Type"] = "application/x-www-form-urlencoded"
        all_headers.setdefault("Accept", "application/json")
        session = self._session_or_new()
        with TransportErrors(target.host, method, target.path):
            async with session.request(
                method, target, data=data, headers=all_headers, allow_redirects=False
            ) as resp:
                body = await read_capped(resp)
                return Reply(
                    resp.status,
                    body,
                    parse_retry_after(resp.headers.get("Retry-After")),
                    resp.headers.get("Location"),
                )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
