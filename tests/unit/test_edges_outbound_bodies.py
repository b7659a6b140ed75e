"""A compressed body is capped as it is inflated, not on the wire (issue 13, item 5).

1 MB of gzip with an honest Content-Length inflates to over a gigabyte; the 4 MiB cap used to
look at Content-Length only and let aiohttp inflate the whole of it into memory. Every place
that reads an answer (the signed client of platforms and suppliers, Fulu, the alert channels)
is fed such a body by a real server on loopback; each must refuse it while its memory stays
small.
"""

from __future__ import annotations

import functools
import struct
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from agent.config import NotifySettings, SupplierSettings
from agent.domain import AlertMessage, BadResponse
from agent.notify.factory import build_notifier
from agent.signed_http import SignedClient
from agent.suppliers.fulu import FuluSupplier

INFLATED_MIB = 1100  # what the body becomes: over a gigabyte
# Far below the inflated size, far above the cap plus what a request costs anyway.
MEMORY_BOUND = 64 * 1024 * 1024
# Alert channels cap a reply at 64 KiB, which the wire size of a gigabyte bomb exceeds by
# itself; theirs is a bomb small on the wire (60 KiB) that still inflates to 60 MiB.
SMALL_INFLATED_MIB = 60
SMALL_MEMORY_BOUND = 16 * 1024 * 1024


@functools.cache
def gzip_bomb(inflated_mib: int = INFLATED_MIB) -> bytes:
    """About 1 KB of gzip per MiB of zeros it inflates to, built without ever
    holding the inflated data: after a full flush, deflate writes each further MiB of zeros
    as the same bytes, so one such segment is repeated; the trailer's CRC is summed a MiB at
    a time."""
    mib = bytes(1 << 20)
    deflate = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: gzip framing
    first = deflate.compress(mib) + deflate.flush(zlib.Z_FULL_FLUSH)
    segment = deflate.compress(mib) + deflate.flush(zlib.Z_FULL_FLUSH)
    last_block = deflate.flush(zlib.Z_FINISH)[:-8]  # the final empty block, without a trailer
    crc = 0
    for _ in range(inflated_mib):
        crc = zlib.crc32(mib, crc)
    trailer = struct.pack("<II", crc, (inflated_mib << 20) & 0xFFFFFFFF)
    return first + segment * (inflated_mib - 1) + last_block + trailer


def test_the_bombs_are_what_they_claim() -> None:
    # Inflating the small one whole checks the construction (the big one is the same with more
    # segments; inflating it here would cost seconds of CPU for nothing).
    small = gzip_bomb(SMALL_INFLATED_MIB)
    inflate = zlib.decompressobj(31)
    total = 0
    for start in range(0, len(small), 1 << 12):
        total += len(inflate.decompress(small[start : start + (1 << 12)]))
    assert inflate.eof and not inflate.unused_data and total == SMALL_INFLATED_MIB << 20
    big = gzip_bomb()
    assert len(big) < 2 * 1024 * 1024
    assert struct.unpack("<I", big[-4:])[0] == (INFLATED_MIB << 20) & 0xFFFFFFFF
    assert INFLATED_MIB << 20 > 1_000_000_000


@pytest.fixture
async def bomb_server() -> AsyncIterator[str]:
    """Answers every request with a bomb: Content-Length set, Content-Encoding: gzip; the
    small one under /small/."""
    big, small = gzip_bomb(), gzip_bomb(SMALL_INFLATED_MIB)
    assert len(small) < 64 * 1024

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        body = small if request.path.startswith("/small/") else big
        return web.Response(
            body=body, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def refused_within_bounded_memory(
    call: Callable[[], Awaitable[Any]], bound: int = MEMORY_BOUND
) -> BadResponse:
    tracemalloc.start()
    try:
        with pytest.raises(BadResponse) as caught:
            await call()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < bound, f"{peak} bytes held while reading a gzip bomb"
    assert "larger than" in str(caught.value)
    return caught.value


async def test_signed_client_caps_the_inflated_body(bomb_server: str) -> None:
    client = SignedClient(bomb_server, "key-id", "hmac-secret", timeout=30.0)
    try:
        await refused_within_bounded_memory(lambda: client.request("GET", "/api/v1/orders"))
    finally:
        await client.close()


def fulu_settings(base_url: str) -> SupplierSettings:
    return SupplierSettings(
        name="fulu",
        kind="fulu",
        base_url=base_url,
        api_key="app-key",
        secret_name="supplier.fulu.secret",
        timeout=30.0,
    )


async def test_fulu_caps_the_inflated_body(bomb_server: str) -> None:
    fulu = FuluSupplier(fulu_settings(bomb_server), "f" * 32)
    try:
        await refused_within_bounded_memory(fulu.balance)
    finally:
        await fulu.close()


MESSAGE = AlertMessage("k", "low_stock", "opened", "warning", "low", 1.0)


@pytest.mark.parametrize(
    "settings",
    [
        NotifySettings("hook", "webhook", {"url": "BASE/hook", "secret": "hook.secret"}),
        NotifySettings("tg", "telegram", {"token": "tg.token", "chat_id": "1", "api_base": "BASE"}),
        NotifySettings("ding", "dingtalk", {"url_secret": "url"}),
        NotifySettings("wecom", "wecom", {"url_secret": "url"}),
        NotifySettings("fs", "feishu", {"url_secret": "url"}),
    ],
    ids=lambda s: s.kind,
)
async def test_alert_channels_cap_the_inflated_body(
    bomb_server: str, settings: NotifySettings
) -> None:
    base = f"{bomb_server}/small"
    options = {k: v.replace("BASE", base) for k, v in settings.options.items()}
    secrets = {
        "hook.secret": "hook-secret-value",
        "tg.token": "123:tg-token-value",
        "url": f"{base}/robot?access_token=robot-token-value",
    }
    notifier = build_notifier(
        NotifySettings(settings.name, settings.kind, options), secrets.__getitem__
    )
    try:
        await refused_within_bounded_memory(lambda: notifier.send(MESSAGE), SMALL_MEMORY_BOUND)
    finally:
        await notifier.close()
