"""The HTTP platform adapter against the sandbox platform on loopback."""

from __future__ import annotations

import pytest
from aiohttp import web

from agent.domain import (
    Ambiguous,
    AuthFailed,
    BadResponse,
    CardItem,
    DeliveryConflict,
    Permanent,
    PlatformOrder,
    RejectedOrder,
    Transient,
)
from agent.platforms.http import HttpPlatform
from agent.sandbox.platform import SandboxPlatform
from agent.signing import sign, verify
from tests.conftest import platform_settings

ITEM = CardItem(code="C1", secret="S1")


def test_signature_round_trip_and_window() -> None:
    sig = sign("k", "1000", "POST", "/api/v1/orders/1/delivery", b"{}")
    assert verify("k", "1000", sig, "POST", "/api/v1/orders/1/delivery", b"{}", 1100) is None
    assert verify("k", "1000", sig, "POST", "/api/v1/orders/1/delivery", b"{ }", 1100)
    assert verify("k", "1000", sig, "POST", "/api/v1/orders/2/delivery", b"{}", 1100)
    assert verify("k", "1000", sig, "POST", "/api/v1/orders/1/delivery", b"{}", 1301) == (
        "timestamp outside the allowed window"
    )


async def test_lists_pages_with_cursor(
    sandbox: SandboxPlatform, http_platform: HttpPlatform
) -> None:
    for _ in range(120):
        sandbox.add_order("GAME-100")
    first = await http_platform.list_paid(None)
    assert len(first.orders) == 50 and first.has_more
    second = await http_platform.list_paid(first.next_cursor)
    third = await http_platform.list_paid(second.next_cursor)
    assert len(second.orders) == 50 and len(third.orders) == 20 and not third.has_more
    ids = [o.order_id for page in (first, second, third) for o in page.orders]
    assert len(set(ids)) == 120


async def test_bad_orders_become_rejections(
    sandbox: SandboxPlatform, http_platform: HttpPlatform
) -> None:
    sandbox.add_order("GAME-100", quantity=0, order_id="Q0")
    sandbox.add_order("GAME-100", quantity=-3, order_id="QN")
    sandbox.add_order("GAME-100", quantity="2", order_id="QS")
    sandbox.add_order(["not", "a", "sku"], order_id="BADSKU")
    sandbox.add_raw_order("NOID", {"sku": "GAME-100", "quantity": 1})
    sandbox.add_order("GAME-100", order_id="GOOD")
    page = await http_platform.list_paid(None)
    by_id = {o.order_id: o for o in page.orders}
    assert page.unidentifiable == 1
    assert isinstance(by_id["GOOD"], PlatformOrder)
    for bad in ("Q0", "QN", "QS", "BADSKU"):
        assert isinstance(by_id[bad], RejectedOrder), bad
    assert "at least 1" in by_id["Q0"].reason  # type: ignore[union-attr]


async def test_wrong_secret_is_auth_failure(sandbox: SandboxPlatform) -> None:
    platform = HttpPlatform(platform_settings(sandbox.base_url), "wrong-secret")
    try:
        with pytest.raises(AuthFailed):
            await platform.list_paid(None)
    finally:
        await platform.close()
    assert sandbox.auth_failures == 1  # auth failures are not retried in-call


async def test_delivery_is_idempotent_and_conflicts_are_reported(
    sandbox: SandboxPlatform, http_platform: HttpPlatform
) -> None:
    order_id = sandbox.add_order("GAME-100")
    await http_platform.deliver(order_id, "key-1", [ITEM], "thanks")
    await http_platform.deliver(order_id, "key-1", [ITEM], "thanks")  # replay
    with pytest.raises(DeliveryConflict):
        await http_platform.deliver(order_id, "key-2", [CardItem("C2", "S2")], "thanks")
    remote = await http_platform.get_order(order_id)
    assert remote.status == "delivered" and remote.items == (ITEM,)
    assert [c.outcome for c in sandbox.delivery_calls] == ["delivered", "replayed", "conflict"]


async def test_unknown_order_is_permanent(http_platform: HttpPlatform) -> None:
    with pytest.raises(Permanent):
        await http_platform.deliver("nope", "k", [ITEM], "")
    with pytest.raises(Permanent):
        await http_platform.get_order("nope/../../etc")


async def test_lost_response_after_commit_is_ambiguous(
    sandbox: SandboxPlatform, http_platform: HttpPlatform
) -> None:
    order_id = sandbox.add_order("GAME-100")
    sandbox.faults.drop_after_commit_rate = 1.0
    with pytest.raises(Ambiguous):
        await http_platform.deliver(order_id, "key-1", [ITEM], "")
    assert sandbox.orders[order_id].delivery is not None  # it did go through


async def test_server_errors_on_delivery_are_ambiguous(
    sandbox: SandboxPlatform, http_platform: HttpPlatform
) -> None:
    order_id = sandbox.add_order("GAME-100")
    sandbox.faults.error_rate = 1.0
    with pytest.raises(Ambiguous):
        await http_platform.deliver(order_id, "key-1", [ITEM], "")
    with pytest.raises(Transient):
        await http_platform.list_paid(None)


async def test_rate_limit_carries_retry_after(
    sandbox: SandboxPlatform, http_platform: HttpPlatform
) -> None:
    sandbox.faults.rate_limit_rate = 1.0
    with pytest.raises(Transient) as caught:
        await http_platform.deliver(sandbox.add_order("GAME-100"), "k", [ITEM], "")
    assert caught.value.retry_after == 1.0


async def test_malformed_list_is_bad_response(
    sandbox: SandboxPlatform, http_platform: HttpPlatform
) -> None:
    sandbox.add_order("GAME-100")
    sandbox.faults.malformed_rate = 1.0
    with pytest.raises(BadResponse):
        await http_platform.list_paid(None)


async def test_connection_refused_is_transient() -> None:
    platform = HttpPlatform(platform_settings("http://127.0.0.1:9"), "s")
    try:
        with pytest.raises(Transient):
            await platform.deliver("1", "k", [ITEM], "")
    finally:
        await platform.close()


@pytest.mark.parametrize("announced", [True, False], ids=["content-length", "chunked"])
async def test_oversized_body_is_refused(announced: bool) -> None:
    async def huge(request: web.Request) -> web.StreamResponse:
        body = b"[" + b"0," * (3 * 1024 * 1024) + b"0]"
        if announced:
            return web.Response(body=body)
        response = web.StreamResponse()  # no Content-Length: the size shows only as it comes
        response.enable_chunked_encoding()
        await response.prepare(request)
        for start in range(0, len(body), 256 * 1024):
            await response.write(body[start : start + 256 * 1024])
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/api/v1/orders", huge)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    platform = HttpPlatform(platform_settings(f"http://127.0.0.1:{port}"), "s")
    try:
        with pytest.raises(BadResponse, match="larger than"):
            await platform.list_paid(None)
    finally:
        await platform.close()
        await runner.cleanup()
