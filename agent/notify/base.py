"""The Notifier port: one channel that can deliver an alert message to a human."""

from __future__ import annotations

import json
from typing import Any, Protocol

import aiohttp

from agent.domain import AlertMessage, Permanent, Transient


class Notifier(Protocol):
    name: str

    async def send(self, message: AlertMessage) -> None:
        """Raises Transient (retry later) or Permanent (misconfigured; retrying won't help)."""
        ...

    async def close(self) -> None: ...


async def post_json(
    session: aiohttp.ClientSession,
    url: str,
    payload: Any = None,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
) -> Any:
    """POSTs JSON (or exactly `body`) and maps failures to Transient/Permanent."""
    if body is None:
        body = json.dumps(payload, ensure_ascii=False).encode()
    try:
        async with session.post(
            url, data=body, headers={"Content-Type": "application/json", **(headers or {})}
        ) as resp:
            text = await resp.text()
            if resp.status >= 500 or resp.status == 429:
                raise Transient(f"HTTP {resp.status}")
            if resp.status >= 400:
                raise Permanent(f"HTTP {resp.status}: {text[:200]}")
            try:
                return json.loads(text) if text else None
            except ValueError:
                return None
    except aiohttp.ClientError as exc:
        raise Transient(f"cannot reach {url.split('?')[0]}: {type(exc).__name__}") from None
    except TimeoutError:
        raise Transient(f"timeout posting to {url.split('?')[0]}") from None


class HttpNotifier:
    """Base for channels that POST JSON: one pooled session, closed with the notifier."""

    name: str

    def __init__(self, name: str, timeout: float = 10.0) -> None:
        self.name = name
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
