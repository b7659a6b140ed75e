"""The Notifier port: one channel that can deliver an alert message to a human."""

from __future__ import annotations

import json
from typing import Any, Protocol

import aiohttp

from agent import safejson
from agent.domain import AlertMessage, Permanent, Transient
from agent.redact import safe_url, scrub
from agent.signed_http import read_capped, redirect_refusal


class Notifier(Protocol):
    name: str

    async def send(self, message: AlertMessage) -> None:
        """Raises Transient (retry later) or Permanent (misconfigured; retrying won't help)."""
        ...

    async def close(self) -> None:
        """Lets go of the channel's connections; called once, when the daemon stops."""


# A robot's answer is a few hundred bytes; anything near this is not a robot answering.
MAX_REPLY_BYTES = 64 * 1024


async def post_json(
    session: aiohttp.ClientSession,
    url: str,
    payload: Any = None,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
) -> Any:
    """POSTs JSON (or exactly `body`) and maps failures to Transient/Permanent.

    Never follows a redirect (it would carry the message and its signature elsewhere). Error
    texts end up in logs and in the ledger's outbox, so they show the URL through `safe_url`
    and the other side's words through `scrub`: robots keep their tokens in the URL.
    """
    if body is None:
        body = json.dumps(payload, ensure_ascii=False).encode()
    where = safe_url(url)
    try:
        async with session.post(
            url,
            data=body,
            headers={"Content-Type": "application/json", **(headers or {})},
            allow_redirects=False,
        ) as resp:
            if 300 <= resp.status < 400:
                raise Permanent(redirect_refusal(resp, where))
            text = (await read_capped(resp, MAX_REPLY_BYTES)).decode("utf-8", "replace")
            if resp.status >= 500 or resp.status == 429:
                raise Transient(f"{where} answered HTTP {resp.status}")
            if resp.status >= 400:
                raise Permanent(f"{where} answered HTTP {resp.status}: {scrub(text)[:200]}")
            try:
                return safejson.loads(text) if text else None
            except safejson.JsonError:
                return None
    except aiohttp.ClientError as exc:
        raise Transient(f"cannot reach {where}: {type(exc).__name__}") from None
    except TimeoutError:
        raise Transient(f"timeout posting to {where}") from None
    except (ValueError, OSError) as exc:
        # E.g. a URL the HTTP stack cannot use; its text would carry the URL.
        raise Permanent(f"cannot post to {where}: {type(exc).__name__}") from None


def timeout_kwargs(timeout: float | None) -> dict[str, float]:
    """An HttpNotifier's `timeout` keyword when one is given (else its own default)."""
    return {} if timeout is None else {"timeout": timeout}


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
