"""A local fake of a dujiao-next shop buying from its upstream site, built from dujiao-next's
documentation and its client code, written independently of the adapter (no imports from
agent.platforms.dujiao): it calls the agent the way the shop does, and receives callbacks.

Sources (docs/platforms/dujiao-next.md says what each one says):
- dujiao-next/document docs/en/api/integration-open-api.md: the endpoints, the headers
  Dujiao-Next-Api-Key / -Timestamp / -Signature, signature = hex HMAC-SHA256(secret,
  "METHOD\\nPATH\\nTIMESTAMP\\nmd5(body)") with the path without query, +-60 s;
  downstream_order_no idempotency; the callback's body and its answer {"ok": true};
  "implement exponential backoff retry for all write operations (1s -> 2s -> 4s)";
- dujiao-next internal/upstream/dujiao_next.go (the shop's client): GET requests sign an
  empty body, a non-200 answer is an error (its error_code kept), ping is POST.

The callback receiver is the shop's HandleCallback (internal/http/handlers/upstream/
upstream_handler.go): it verifies the signature over the fixed path /api/v1/upstream/callback
whatever URL it is reached at (`callback_prefix` puts it behind a reverse proxy's path, as a
shop under a sub-path is), and answers every refusal or failure HTTP 200 `{"ok": false,
"message": ...}`. It can be made to fail (`fail_rate`: `ok: false`, a proxy's 500, or no answer
at all) to exercise the supplier's retries.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from tests.loopback import serve

CALLBACK_PATH = "/api/v1/upstream/callback"


def sign(secret: str, method: str, path: str, timestamp: int, body: bytes) -> str:
    body_md5 = hashlib.md5(body).hexdigest()
    text = f"{method}\n{path}\n{timestamp}\n{body_md5}"
    return hmac.new(secret.encode(), text.encode(), hashlib.sha256).hexdigest()


@dataclass
class Answer:
    status: int  # 0: no HTTP answer
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Received:
    downstream_order_no: str
    body: dict[str, Any]


@dataclass
class FakeShop:
    api_key: str
    secret: str
    upstream_url: str = ""  # the supplier's base URL (the listener, with any prefix)
    retry_base: float = 1.0  # the documented 1 s -> 2 s -> 4 s, scaled by tests
    fail_rate: float = 0.0  # callbacks answered 500 or not at all
    seed: int = 1
    clock_skew: float = 0.0  # seconds added to the shop's clock
    callback_prefix: str = ""  # a reverse proxy's path in front of the shop ("/shop")
    callbacks: list[Received] = field(default_factory=list)
    callback_attempts: int = 0
    refused_callbacks: int = 0  # bad signatures or stale timestamps
    base_url: str = ""
    _runner: web.AppRunner | None = None
    _session: aiohttp.ClientSession | None = None

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post(self.callback_prefix + CALLBACK_PATH, self._callback)
        self._runner, self.base_url = await serve(app, access_log=None)
        self._session = aiohttp.ClientSession()

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def callback_url(self) -> str:
        return self.base_url + self.callback_prefix + CALLBACK_PATH

    # --- the shop calling its supplier ---------------------------------------------------
    async def request(self, method: str, path: str, payload: Any = None) -> Answer:
        """One signed call (path may carry a query, which is not signed)."""
        assert self._session is not None
        body = b"" if payload is None else json.dumps(payload).encode()
        ts = int(time.time() + self.clock_skew)
        sign_path = path.split("?", 1)[0]
        headers = {
            "Dujiao-Next-Api-Key": self.api_key,
            "Dujiao-Next-Timestamp": str(ts),
            "Dujiao-Next-Signature": sign(self.secret, method, sign_path, ts, body),
        }
        if payload is not None:
            headers["Content-Type"] = "application/json"
        try:
            async with self._session.request(
                method,
                self.upstream_url + path,
                data=body or None,
                headers=headers,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=10),
            ) as resp:
                return Answer(resp.status, await resp.read())
        except (aiohttp.ClientError, TimeoutError):
            return Answer(0, b"")

    async def ping(self) -> Answer:
        return await self.request("POST", "/api/v1/upstream/ping")

    async def products(self, page: int = 1, size: int = 20) -> Answer:
        return await self.request("GET", f"/api/v1/upstream/products?page={page}&page_size={size}")

    async def create_order(
        self, sku_id: int, quantity: int, order_no: str, *, callback: bool = True, tries: int = 4
    ) -> Answer:
        """POST /orders, retried with backoff while there is no answer or a 5xx (the
        documented retry for write operations)."""
        payload = {
            "sku_id": sku_id,
            "quantity": quantity,
            "downstream_order_no": order_no,
            "trace_id": f"trace-{order_no}",
            "callback_url": self.callback_url if callback else "",
        }
        answer = Answer(0, b"")
        for attempt in range(tries):
            if attempt:
                await asyncio.sleep(self.retry_base * 2 ** (attempt - 1))
            answer = await self.request("POST", "/api/v1/upstream/orders", payload)
            if answer.status and answer.status < 500:
                return answer
        return answer

    async def get_order(self, order_id: int) -> Answer:
        return await self.request("GET", f"/api/v1/upstream/orders/{order_id}")

    async def cancel(self, order_id: int) -> Answer:
        return await self.request("POST", f"/api/v1/upstream/orders/{order_id}/cancel")

    # --- the callback the supplier pushes ------------------------------------------------
    async def _callback(self, request: web.Request) -> web.StreamResponse:
        self.callback_attempts += 1
        body = await request.read()
        ts_raw = request.headers.get("Dujiao-Next-Timestamp", "")
        ok = (
            request.headers.get("Dujiao-Next-Api-Key") == self.api_key
            and ts_raw.isdigit()
            and abs(time.time() - int(ts_raw)) <= 60
            and hmac.compare_digest(
                request.headers.get("Dujiao-Next-Signature", ""),
                # The fixed path, not the one this request came in on (HandleCallback).
                sign(self.secret, "POST", CALLBACK_PATH, int(ts_raw or 0), body),
            )
        )
        if not ok:
            self.refused_callbacks += 1
            return web.json_response({"ok": False, "message": "signature verification failed"})
        roll = self._rng.random()
        if roll < self.fail_rate / 4:
            return web.json_response({"ok": False, "message": "callback processing failed"})
        if roll < self.fail_rate / 2:
            return web.json_response({"ok": False, "message": "busy"}, status=500)
        if roll < self.fail_rate:
            assert request.transport is not None
            request.transport.close()  # no answer at all
            return web.Response()
        data = json.loads(body)
        self.callbacks.append(Received(str(data.get("downstream_order_no")), data))
        return web.json_response({"ok": True, "message": "received"})
