"""The inbound listener (agent/listener.py) against hostile input, on 127.0.0.1: credentials
are checked before a byte of the body is read (a wrong token or a stale timestamp is refused
while the body has not even been sent), bodies are capped however framed, compressed bodies
refused, unknown paths 404 with nothing said, slow clients cut off, connections capped, and a
flood of unauthenticated requests leaves a real caller answered. Nothing of a token, key or
body reaches the log."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import AsyncIterator
from typing import TextIO

import aiohttp
import pytest

from agent import logs
from agent.listener import Listener
from agent.listener_routes import (
    BearerAuth,
    Inbound,
    Mount,
    Outbound,
    Route,
    SignedHeadersAuth,
    hmac_sha256_hex,
)
from agent.listener_settings import ListenerSettings

TOKEN = "eW91ci1jYWxsYmFjay10b2tlbi1mb3ItdGVzdHM="
SECRET = "dujiao-shared-secret-for-tests"
API_KEY = "shop-key-1"
HEADERS = ("Dujiao-Next-Api-Key", "Dujiao-Next-Timestamp", "Dujiao-Next-Signature")


class Seen:
    def __init__(self) -> None:
        self.calls: list[Inbound] = []

    async def handle(self, inbound: Inbound) -> Outbound:
        self.calls.append(inbound)
        body = json.loads(inbound.body or b"{}")
        return Outbound(200, json.dumps({"echo": body}).encode(), order_id=str(body.get("id")))


def refused(reason: str) -> Outbound:
    return Outbound(401, json.dumps({"ok": False, "error_code": reason}).encode())


@pytest.fixture
async def seen() -> Seen:
    return Seen()


@pytest.fixture
async def listener(seen: Seen) -> AsyncIterator[Listener]:
    settings = ListenerSettings(
        port=0, max_body_bytes=4096, header_timeout=0.5, body_timeout=0.5, max_connections=64
    )
    routes = [
        Route("eneba", "POST", "/eneba/main", BearerAuth(TOKEN, refused), seen.handle),
        Route(
            "shop",
            "POST",
            "/api/v1/upstream/orders",
            SignedHeadersAuth(API_KEY, SECRET, HEADERS, 60.0, refused),
            seen.handle,
        ),
        Route(
            "shop",
            "GET",
            "/api/v1/upstream/orders/{id}",
            SignedHeadersAuth(API_KEY, SECRET, HEADERS, 60.0, refused),
            seen.handle,
        ),
    ]
    server = Listener(settings, [Mount(routes)])
    await server.start()
    yield server
    await server.stop()


def url(listener: Listener, path: str) -> str:
    assert listener.address is not None
    return f"http://127.0.0.1:{listener.address[1]}{path}"


def signed(method: str, path: str, body: bytes, *, ts: int | None = None) -> dict[str, str]:
    stamp = str(int(time.time()) if ts is None else ts)
    return {
        HEADERS[0]: API_KEY,
        HEADERS[1]: stamp,
        HEADERS[2]: hmac_sha256_hex(SECRET, method, path, stamp, body),
    }


async def raw(listener: Listener, head: bytes, body: bytes = b"", wait: float = 2.0) -> bytes:
    """Sends `head` (and `body`), returns what comes back within `wait` (b"" when cut off)."""
    assert listener.address is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", listener.address[1])
    try:
        writer.write(head + body)
        await writer.drain()
        try:
            return await asyncio.wait_for(reader.read(65536), wait)
        except TimeoutError:
            return b"(no answer)"
    finally:
        writer.close()


async def test_a_real_caller_is_answered(listener: Listener, seen: Seen) -> None:
    async with aiohttp.ClientSession() as http:
        body = b'{"id": "o-1"}'
        resp = await http.post(
            url(listener, "/eneba/main"), data=body, headers={"Authorization": f"Bearer {TOKEN}"}
        )
        assert resp.status == 200 and await resp.json() == {"echo": {"id": "o-1"}}
        path = "/api/v1/upstream/orders/42"
        resp = await http.get(url(listener, path), headers=signed("GET", path, b""))
        assert resp.status == 200
    assert seen.calls[-1].params == {"id": "42"}


async def test_unknown_paths_and_methods_are_404_with_nothing_said(listener: Listener) -> None:
    async with aiohttp.ClientSession() as http:
        for method, path in (
            ("GET", "/"),
            ("GET", "/eneba/main"),
            ("POST", "/admin"),
            ("DELETE", "/api/v1/upstream/orders"),
        ):
            resp = await http.request(method, url(listener, path))
            assert resp.status == 404 and await resp.read() == b"", (method, path)
            assert "aiohttp" not in resp.headers.get("Server", "")
    # Paths are matched as sent: no dot segments resolved, no decoding.
    for path in (b"/eneba/main/../main", b"/eneba/%6dain", b"/eneba//main", b"/eneba/main/"):
        head = b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
        answer = await raw(listener, head)
        assert answer.startswith(b"HTTP/1.1 404") and answer.endswith(b"\r\n\r\n"), path


async def test_a_wrong_token_is_refused_before_the_body_is_read(
    listener: Listener, seen: Seen
) -> None:
    # Headers promise a body that never comes: a listener reading it first would wait for it
    # (and answer 408 after body_timeout); the token is refused at once instead.
    head = (
        b"POST /eneba/main HTTP/1.1\r\nHost: x\r\nContent-Length: 3000\r\n"
        b"Authorization: Bearer wrong\r\n\r\n"
    )
    started = time.monotonic()
    answer = await raw(listener, head, wait=0.4)
    assert answer.startswith(b"HTTP/1.1 401"), answer
    assert time.monotonic() - started < 0.4
    no_auth = await raw(listener, head.replace(b"Authorization: Bearer wrong\r\n", b""), wait=0.4)
    assert no_auth.startswith(b"HTTP/1.1 401")
    # The right token with the body withheld: the body's deadline, not the handler.
    ok_head = head.replace(b"Bearer wrong", f"Bearer {TOKEN}".encode())
    assert (await raw(listener, ok_head, wait=2.0)).startswith(b"HTTP/1.1 408")
    assert seen.calls == []


async def test_a_stale_timestamp_or_wrong_key_is_refused_before_the_body(
    listener: Listener, seen: Seen
) -> None:
    path = "/api/v1/upstream/orders"
    for headers, reason in (
        (signed("POST", path, b"{}", ts=int(time.time()) - 61), "timestamp_expired"),
        (signed("POST", path, b"{}", ts=int(time.time()) + 120), "timestamp_expired"),
        ({**signed("POST", path, b"{}"), HEADERS[0]: "other-key"}, "invalid_api_key"),
        ({**signed("POST", path, b"{}"), HEADERS[1]: "12.5"}, "invalid_timestamp"),
        ({HEADERS[0]: API_KEY}, "missing_auth_headers"),
    ):
        lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n{lines}\r\n".encode()
        answer = await raw(listener, head, wait=0.4)
        assert answer.startswith(b"HTTP/1.1 401"), (reason, answer)
        assert reason.encode() in answer
    assert seen.calls == []


async def test_a_bad_signature_is_refused_before_the_body_is_parsed(
    listener: Listener, seen: Seen
) -> None:
    path = "/api/v1/upstream/orders"
    async with aiohttp.ClientSession() as http:
        headers = signed("POST", path, b'{"id": 1}')
        resp = await http.post(url(listener, path), data=b'{"id": 2}', headers=headers)
        assert resp.status == 401 and (await resp.json())["error_code"] == "invalid_signature"
        # Not JSON at all, signed by someone without the secret: refused, never parsed.
        resp = await http.post(url(listener, path), data=b"\xff{{{", headers=headers)
        assert resp.status == 401
        # The path is signed too: a signature for another path does not open this one.
        other = signed("POST", "/api/v1/upstream/ping", b"")
        resp = await http.post(url(listener, path), data=b"", headers=other)
        assert resp.status == 401
    assert seen.calls == []


async def test_bodies_are_capped_however_they_are_framed(listener: Listener, seen: Seen) -> None:
    auth = f"Authorization: Bearer {TOKEN}\r\n".encode()
    declared = (
        b"POST /eneba/main HTTP/1.1\r\nHost: x\r\nContent-Length: 999999\r\n" + auth + b"\r\n"
    )
    assert (await raw(listener, declared, wait=1.0)).startswith(b"HTTP/1.1 413")
    chunk = b"1000\r\n" + b"x" * 4096 + b"\r\n"
    chunked = (
        b"POST /eneba/main HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n" + auth + b"\r\n"
    )
    assert (await raw(listener, chunked, chunk * 3 + b"0\r\n\r\n")).startswith(b"HTTP/1.1 413")
    gz = b"POST /eneba/main HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\nContent-Length: 10\r\n"
    assert (await raw(listener, gz + auth + b"\r\n", b"0123456789")).startswith(b"HTTP/1.1 415")
    assert seen.calls == []


async def test_slow_clients_are_cut_off_and_others_still_answered(listener: Listener) -> None:
    assert listener.address is not None
    port = listener.address[1]
    slow = [await asyncio.open_connection("127.0.0.1", port) for _ in range(40)]
    for _, writer in slow:
        writer.write(b"POST /eneba/main HTTP/1.1\r\nHost: x\r\n")
    async with aiohttp.ClientSession() as http:
        for _ in range(6):  # keep trickling a header byte at a time, past header_timeout
            for _, writer in slow:
                if not writer.is_closing():
                    writer.write(b"X")
            await asyncio.sleep(0.15)
            resp = await http.post(
                url(listener, "/eneba/main"),
                data=b"{}",
                headers={"Authorization": f"Bearer {TOKEN}"},
            )
            assert resp.status == 200
    closed = 0
    for reader, writer in slow:
        try:
            got = await asyncio.wait_for(reader.read(100), 1.0)
        except TimeoutError:
            got = b"(open)"
        except ConnectionError:  # aborted: a reset
            got = b""
        closed += got == b""
        writer.close()
    assert closed == len(slow)


async def test_a_reply_slower_than_header_timeout_still_arrives_and_the_idle_one_goes() -> None:
    """The header deadline does not run while a request is answered (a ledger that takes a
    while); it starts again at the reply, and an idle kept-alive connection is cut at it."""

    async def slow(inbound: Inbound) -> Outbound:
        await asyncio.sleep(0.8)  # past header_timeout (0.3), more than two times over
        return Outbound(200, b'{"ok":true}')

    settings = ListenerSettings(port=0, header_timeout=0.3, max_connections=8)
    route = Route("eneba", "POST", "/eneba/main", BearerAuth(TOKEN, refused), slow)
    server = Listener(settings, [Mount([route])])
    await server.start()
    assert server.address is not None
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.address[1])
        head = (
            b"POST /eneba/main HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
            + f"Authorization: Bearer {TOKEN}\r\n\r\n".encode()
        )
        writer.write(head + b"{}")
        answer = await asyncio.wait_for(reader.read(4096), 3.0)
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b'{"ok":true}')
        # Kept alive and silent past header_timeout: closed.
        assert await asyncio.wait_for(reader.read(10), 3.0) == b""
        writer.close()
    finally:
        await server.stop()


async def test_connections_beyond_the_cap_are_closed(seen: Seen) -> None:
    settings = ListenerSettings(port=0, header_timeout=5.0, max_connections=5)
    route = Route("eneba", "POST", "/eneba/main", BearerAuth(TOKEN, refused), seen.handle)
    server = Listener(settings, [Mount([route])])
    await server.start()
    assert server.address is not None
    try:
        held = [await asyncio.open_connection("127.0.0.1", server.address[1]) for _ in range(5)]
        reader, writer = await asyncio.open_connection("127.0.0.1", server.address[1])
        assert await asyncio.wait_for(reader.read(10), 2.0) == b""
        writer.close()
        for _, w in held:
            w.close()
    finally:
        await server.stop()


async def test_a_flood_of_unauthenticated_requests_leaves_callers_answered_and_logs_no_token(
    listener: Listener, seen: Seen, quiet_logs: TextIO
) -> None:
    sink = io.StringIO()
    logs.configure("info", sink)
    try:
        async with aiohttp.ClientSession() as http:

            async def intruder(n: int) -> int:
                try:
                    resp = await http.post(
                        url(listener, "/eneba/main"),
                        data=b'{"id": "x"}',
                        headers={"Authorization": f"Bearer guess-{n}-{TOKEN[:-4]}"},
                    )
                except aiohttp.ClientError:  # refused before its body was read, and closed
                    return 0
                return resp.status

            flood = asyncio.gather(*(intruder(n) for n in range(600)))
            answered = []
            for n in range(5):
                resp = await http.post(
                    url(listener, "/eneba/main"),
                    data=json.dumps({"id": f"real-{n}"}).encode(),
                    headers={"Authorization": f"Bearer {TOKEN}"},
                )
                answered.append(resp.status)
            statuses = await flood
        assert answered == [200] * 5
        assert set(statuses) <= {401, 0} and statuses.count(401) > len(statuses) // 2
        assert [c for c in seen.calls if b"real" not in c.body] == []
    finally:
        logs.configure("debug", quiet_logs)
    text = sink.getvalue()
    assert TOKEN not in text and TOKEN[:-4] not in text
    refusals = [json.loads(x) for x in text.splitlines() if "listener_refused" in x]
    assert refusals and len(refusals) < 20  # counted, not one line per request
    assert len([x for x in text.splitlines() if "listener_request" in x]) == 5
