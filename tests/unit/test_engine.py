"""The engine end to end, in-process, against the sandbox platform on loopback."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter
from collections.abc import Collection, Sequence
from pathlib import Path

import pytest

from agent import runtime
from agent.domain import DeliveryIntent, LineState, OrderLine, PlatformOrder, RejectedOrder
from agent.engine import CLAIM_CHUNK, Engine, screen_order
from agent.platforms.http import HttpPlatform
from agent.sandbox.platform import SandboxPlatform
from agent.signed_http import DEFAULT_CONNECTIONS
from agent.store.base import Store, StoreError
from tests.conftest import make_config, platform_settings, stock
from tests.helpers import (
    assert_platform_invariants,
    delivered_all,
    line_state_is,
    running_agent,
    wait_for,
)


async def test_delivers_orders_with_distinct_keys(
    tmp_path: Path, sandbox: SandboxPlatform, store: Store
) -> None:
    await stock(store, "GAME-100", 40)
    ids = [sandbox.add_order("GAME-100", quantity=1 + i % 3) for i in range(20)]
    async with running_agent(make_config(tmp_path, sandbox.base_url), store, sandbox):
        await wait_for(delivered_all(sandbox, ids), "deliveries")
    assert_platform_invariants(sandbox)
    counts = await store.count_by_state()
    assert counts == {LineState.DELIVERED: 20}


async def test_catches_up_on_orders_paid_while_down(
    tmp_path: Path, sandbox: SandboxPlatform, store: Store
) -> None:
    await stock(store, "GAME-100", 300)
    ids = [sandbox.add_order("GAME-100") for _ in range(260)]  # several pages, before start
    async with running_agent(make_config(tmp_path, sandbox.base_url), store, sandbox):
        await wait_for(delivered_all(sandbox, ids), "catch-up")
    assert_platform_invariants(sandbox)


async def test_survives_faults_with_same_key_resends_only(
    tmp_path: Path, sandbox: SandboxPlatform, store: Store
) -> None:
    sandbox.faults.error_rate = 0.15
    sandbox.faults.drop_after_commit_rate = 0.25
    sandbox.faults.duplicate_rate = 0.3
    sandbox.faults.malformed_rate = 0.1
    await stock(store, "GAME-100", 200)
    ids = [sandbox.add_order("GAME-100", quantity=1 + i % 2) for i in range(80)]
    config = make_config(tmp_path, sandbox.base_url)
    async with running_agent(config, store, sandbox):
        await wait_for(delivered_all(sandbox, ids), "deliveries despite faults")

        # the agent's own ledger must agree once its retries settle
        async def settled() -> bool:
            return (await store.count_by_state()) == {LineState.DELIVERED: 80}

        await wait_for(settled, "ledger settles")
    assert_platform_invariants(sandbox)
    outcomes = Counter(call.outcome for call in sandbox.delivery_calls)
    assert outcomes["dropped"] > 0  # the fault really happened
    assert outcomes["conflict"] == 0


async def test_bad_input_is_parked_and_the_rest_delivered(
    tmp_path: Path, sandbox: SandboxPlatform, store: Store
) -> None:
    await stock(store, "GAME-100", 10)
    good = [sandbox.add_order("GAME-100"), sandbox.add_order("GAME-100")]
    sandbox.add_order("NO-SUCH-SKU", order_id="UNKNOWN")
    sandbox.add_order("GAME-100", quantity=0, order_id="ZERO")
    sandbox.add_order("GAME-100", quantity=500, order_id="ABSURD")
    sandbox.add_order("GAME-100", quantity=True, order_id="BOOL")
    sandbox.add_raw_order("GARBAGE", "just a string")
    sandbox.add_raw_order("HUGE", {"id": "H" * 10_000, "sku": "GAME-100", "quantity": 1})
    async with running_agent(make_config(tmp_path, sandbox.base_url), store, sandbox):
        await wait_for(delivered_all(sandbox, good), "good orders")
        parked = {"UNKNOWN", "ZERO", "ABSURD", "BOOL"}

        async def parked_all() -> bool:
            lines = await store.list_lines(LineState.NEEDS_ATTENTION, 100)
            return {line.order_id for line in lines} == parked

        await wait_for(parked_all, "bad orders parked")
    reasons = {ln.order_id: ln.reason for ln in await store.list_lines(None, 100)}
    assert "unknown SKU" in (reasons["UNKNOWN"] or "")
    assert "exceeds max_quantity" in (reasons["ABSURD"] or "")
    assert (await store.stock_counts())[0].bound == 2


async def test_backorder_is_filled_after_import(
    tmp_path: Path, sandbox: SandboxPlatform, store: Store
) -> None:
    await stock(store, "VIP-30D", 1)
    first, second = sandbox.add_order("VIP-30D"), sandbox.add_order("VIP-30D", quantity=2)
    async with running_agent(make_config(tmp_path, sandbox.base_url), store, sandbox):
        await wait_for(delivered_all(sandbox, [first]), "first order")
        await wait_for(line_state_is(store, second, LineState.BACKORDERED), "backorder")
        await stock(store, "VIP-30D", 2, start=50)
        await wait_for(delivered_all(sandbox, [second]), "backordered order")
    assert_platform_invariants(sandbox)


async def test_order_cancelled_during_outage_is_closed_not_delivered(
    tmp_path: Path, sandbox: SandboxPlatform, store: Store
) -> None:
    order_id = sandbox.add_order("GAME-100")
    config = make_config(tmp_path, sandbox.base_url)
    async with running_agent(config, store, sandbox):
        await wait_for(line_state_is(store, order_id, LineState.BACKORDERED), "backorder")
        sandbox.faults.error_rate = 1.0  # from now on the platform is down
        await stock(store, "GAME-100", 2)

        async def attempted() -> bool:
            (line,) = await store.find_lines(order_id)
            return line.attempts > 0 and line.ambiguous

        await wait_for(attempted, "a failed delivery attempt")
        sandbox.set_status(order_id, "cancelled")
        sandbox.faults.error_rate = 0.0
        line_id = (await store.find_lines(order_id))[0].id
        await store.defer(line_id, 0, "test: retry now", ambiguous=True, now=time.time())
        await wait_for(line_state_is(store, order_id, LineState.CANCELLED), "cancelled")
    assert sandbox.orders[order_id].delivery is None
    assert [c.outcome for c in sandbox.delivery_calls] == []  # never reached the handler


async def test_resend_uses_same_keys_with_a_new_key(
    tmp_path: Path, sandbox: SandboxPlatform, store: Store
) -> None:
    await stock(store, "GAME-100", 5)
    order_id = sandbox.add_order("GAME-100")
    async with running_agent(make_config(tmp_path, sandbox.base_url), store, sandbox):
        await wait_for(line_state_is(store, order_id, LineState.DELIVERED), "delivery")
        (line,) = await store.find_lines(order_id)
        await store.resend_line(line.id, time.time())
        await wait_for(lambda: len(sandbox.delivery_calls) == 2, "resend")
    first, second = sandbox.delivery_calls
    assert first.secrets == second.secrets
    assert first.idempotency_key != second.idempotency_key
    assert second.outcome == "resent"


def test_screen_order_rules() -> None:
    from agent.config import SkuSettings
    from agent.domain import PlatformOrder, RejectedOrder

    skus = {"A": SkuSettings(sku="A", max_quantity=3)}
    ok = PlatformOrder("1", "paid", "A", 3)
    assert screen_order(ok, skus) is ok
    assert screen_order(PlatformOrder("1", "delivered", "A", 1), skus) is None
    assert isinstance(screen_order(PlatformOrder("1", "paid", "A", 4), skus), RejectedOrder)
    assert isinstance(screen_order(PlatformOrder("1", "paid", "B", 1), skus), RejectedOrder)


async def test_long_poll_takes_orders_without_waiting_for_a_poll(
    tmp_path: Path, sandbox: SandboxPlatform, store: Store
) -> None:
    await stock(store, "GAME-100", 5)
    config = make_config(tmp_path, sandbox.base_url, poll_interval=3600, reconcile_interval=3600)
    main = dataclasses.replace(config.platforms[0], long_poll=True)
    config = dataclasses.replace(config, platforms=(main,))
    async with running_agent(config, store, sandbox):
        await wait_for(lambda: sandbox.requests >= 3, "start-up poll, reconcile, long poll")
        await asyncio.sleep(0.2)  # let the start-up listings finish
        order_id = sandbox.add_order("GAME-100")  # the next poll is an hour away
        await wait_for(delivered_all(sandbox, [order_id]), "delivery via long poll")


async def test_delivery_whose_record_fails_is_reconciled_not_resent(
    tmp_path: Path, sandbox: SandboxPlatform, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers do not wait for a delivery to be recorded. When that record fails, the line
    is still `delivering` with its attempt made: the sweep asks the platform, which has the
    delivery, and records it, with no second delivery call."""
    await stock(store, "GAME-100", 5)
    real = store.mark_many_delivered
    failures: list[int] = []

    async def fails_once(deliveries: Sequence[tuple[int, str]], now: float) -> None:
        if not failures:
            failures.append(len(deliveries))
            raise StoreError("disk I/O error (injected)")
        await real(deliveries, now)

    monkeypatch.setattr(store, "mark_many_delivered", fails_once)
    order_id = sandbox.add_order("GAME-100")
    async with running_agent(make_config(tmp_path, sandbox.base_url), store, sandbox):
        await wait_for(line_state_is(store, order_id, LineState.DELIVERED), "recorded at last")
    assert failures == [1]
    assert [c.order_id for c in sandbox.delivery_calls] == [order_id]
    assert_platform_invariants(sandbox)


async def test_intake_chunk_failure_loses_no_order(
    tmp_path: Path, sandbox: SandboxPlatform, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Intake takes a page in chunks, two in flight. When the first fails (nothing of it is
    recorded), the second, already on its way to the ledger, still goes out straight away,
    and the failed chunk's orders are taken in when the page is read again."""
    await stock(store, "GAME-100", 2 * CLAIM_CHUNK)
    real = store.take_in
    failed: list[str] = []

    async def first_fails(
        platform: str,
        orders: Sequence[PlatformOrder | RejectedOrder],
        now: float,
        local_skus: Collection[str],
    ) -> list[DeliveryIntent | OrderLine]:
        if not failed:
            failed.extend(o.order_id for o in orders)
            raise StoreError("database is locked (injected)")
        return await real(platform, orders, now, local_skus)

    monkeypatch.setattr(store, "take_in", first_fails)
    ids = [sandbox.add_order("GAME-100") for _ in range(2 * CLAIM_CHUNK)]
    config = make_config(tmp_path, sandbox.base_url)
    async with running_agent(config, store, sandbox, page_size=2 * CLAIM_CHUNK):
        await wait_for(delivered_all(sandbox, ids), "every order, the failed chunk's too")
    assert len(failed) == CLAIM_CHUNK
    assert sorted(c.order_id for c in sandbox.delivery_calls) == sorted(ids)
    # Each was sent as it was claimed: none waited for the sweep to find it claimed but
    # unsent, which would have asked the platform first ("reconciled").
    for order_id in ids:
        (line,) = await store.find_lines(order_id)
        assert "reconciled" not in [e.kind for e in await store.events(line.id)]
    assert_platform_invariants(sandbox)


async def test_sweep_leaves_lines_to_the_take_in_recording_them(
    tmp_path: Path, sandbox: SandboxPlatform, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sweeps run while a take-in has committed its claims but not yet handed them out: they
    leave those lines to it, instead of taking them for unfinished sends that must be
    checked with the platform first."""
    await stock(store, "GAME-100", 10)
    real = store.take_in

    async def slow_to_return(
        platform: str,
        orders: Sequence[PlatformOrder | RejectedOrder],
        now: float,
        local_skus: Collection[str],
    ) -> list[DeliveryIntent | OrderLine]:
        taken = await real(platform, orders, now, local_skus)
        await asyncio.sleep(0.5)  # sweeps run every 0.05 s meanwhile
        return taken

    monkeypatch.setattr(store, "take_in", slow_to_return)
    ids = [sandbox.add_order("GAME-100") for _ in range(10)]
    async with running_agent(make_config(tmp_path, sandbox.base_url), store, sandbox):
        await wait_for(delivered_all(sandbox, ids), "deliveries")
    for order_id in ids:
        (line,) = await store.find_lines(order_id)
        assert [e.kind for e in await store.events(line.id)] == [
            "intake",
            "allocated",
            "delivery_intent",
            "delivered",
        ]
    assert sorted(c.order_id for c in sandbox.delivery_calls) == sorted(ids)


async def test_intake_stays_a_bounded_distance_ahead_of_the_workers(
    tmp_path: Path, sandbox: SandboxPlatform, store: Store
) -> None:
    """A burst far larger than the workers can send at once: intake claims only so far
    ahead of them, so a claimed line soon goes out (on a shared ledger its lease runs while
    it waits) and memory does not grow with the burst."""
    count = 800
    await stock(store, "GAME-100", count)
    sandbox.faults.latency = 0.05  # a platform that answers in tens of milliseconds
    ids = [sandbox.add_order("GAME-100") for _ in range(count)]
    config = make_config(tmp_path, sandbox.base_url)  # 8 workers
    most_claimed = 0

    async def watch() -> None:
        nonlocal most_claimed
        while True:
            states = await store.count_by_state()
            most_claimed = max(most_claimed, states.get(LineState.DELIVERING, 0))
            await asyncio.sleep(0.02)

    async with running_agent(config, store, sandbox, page_size=count):
        watcher = asyncio.create_task(watch())
        await wait_for(delivered_all(sandbox, ids), "deliveries")
        watcher.cancel()
    # At most a chunk's worth ahead (4 per worker, but at least CLAIM_CHUNK), two chunks
    # being claimed, and the calls in flight: not the whole burst.
    assert 0 < most_claimed <= 3 * CLAIM_CHUNK + config.agent.concurrency
    assert_platform_invariants(sandbox)


async def test_a_line_settled_meanwhile_is_not_parked(
    tmp_path: Path, sandbox: SandboxPlatform, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a shared ledger another agent may finish a line (its lease ran out while it
    waited here) between our check with the platform and our next step: that line is done,
    not a problem to park."""
    await stock(store, "GAME-100", 1)
    order_id = sandbox.add_order("GAME-100")
    (claimed,) = await store.take_in(
        "main", [PlatformOrder(order_id, "paid", "GAME-100", 1)], time.time(), {"GAME-100"}
    )
    assert isinstance(claimed, DeliveryIntent)  # intent committed, never sent: a crash
    real = store.begin_delivery

    async def finished_elsewhere_first(line_id: int, now: float) -> DeliveryIntent:
        await store.mark_delivered(line_id, now, "by another agent")
        return await real(line_id, now)

    monkeypatch.setattr(store, "begin_delivery", finished_elsewhere_first)
    async with running_agent(make_config(tmp_path, sandbox.base_url), store, sandbox):
        await wait_for(
            line_state_is(store, order_id, LineState.DELIVERED), "settled by the other agent"
        )
        await asyncio.sleep(0.3)  # sweeps come and go
    (line,) = await store.find_lines(order_id)
    assert line.state == LineState.DELIVERED
    assert "parked" not in [e.kind for e in await store.events(line.id)]


async def test_calls_in_flight_follow_concurrency_past_the_default_pool(
    tmp_path: Path, sandbox: SandboxPlatform, store: Store
) -> None:
    """A merchant raises concurrency for a distant platform: the adapter's connection pool
    follows, so that many deliveries are under way at once, not a fixed pool's worth."""
    count = DEFAULT_CONNECTIONS + 36
    await stock(store, "GAME-100", count)
    sandbox.faults.latency = 0.5  # each request waits up to half a second: a distant platform
    ids = [sandbox.add_order("GAME-100") for _ in range(count)]
    config = make_config(tmp_path, sandbox.base_url, concurrency=count)
    async with running_agent(config, store, sandbox, page_size=count):
        await wait_for(delivered_all(sandbox, ids), "deliveries")
    assert sandbox.max_in_flight > DEFAULT_CONNECTIONS
    assert_platform_invariants(sandbox)


async def test_long_poll_survives_a_failed_intake(
    tmp_path: Path, sandbox: SandboxPlatform, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ledger refuses one page the long poll brought: the long poll starts again from the
    stored cursor and delivers it, with the next scheduled poll an hour away."""
    await stock(store, "GAME-100", 5)
    real = store.take_in
    refused: list[int] = []

    async def refuses_once(
        platform: str,
        orders: Sequence[PlatformOrder | RejectedOrder],
        now: float,
        local_skus: Collection[str],
    ) -> list[DeliveryIntent | OrderLine]:
        if orders and not refused:
            refused.append(len(orders))
            raise StoreError("database is locked (injected)")
        return await real(platform, orders, now, local_skus)

    config = make_config(tmp_path, sandbox.base_url, poll_interval=3600, reconcile_interval=3600)
    main = dataclasses.replace(config.platforms[0], long_poll=True)
    async with running_agent(dataclasses.replace(config, platforms=(main,)), store, sandbox):
        await wait_for(lambda: sandbox.requests >= 3, "start-up poll, reconcile, long poll")
        await asyncio.sleep(0.2)  # let the start-up listings finish
        monkeypatch.setattr(store, "take_in", refuses_once)
        order_id = sandbox.add_order("GAME-100")
        await wait_for(delivered_all(sandbox, [order_id]), "delivery via the long poll")
    assert refused == [1]
    assert_platform_invariants(sandbox)


async def test_poll_job_rests_while_the_long_poll_answers(
    tmp_path: Path, sandbox: SandboxPlatform, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both read from the same cursor, so polling beside a working long poll would take every
    page in twice. Once the platform stops offering the long poll, polling is back."""
    monkeypatch.setattr(runtime, "LONG_POLL_SECONDS", 0.2)  # an empty answer every 0.2 s
    await stock(store, "GAME-100", 5)
    config = make_config(tmp_path, sandbox.base_url, poll_interval=0.05, reconcile_interval=3600)
    main = dataclasses.replace(config.platforms[0], long_poll=True)
    config = dataclasses.replace(config, platforms=(main,))
    async with running_agent(config, store, sandbox):
        first = sandbox.add_order("GAME-100")
        await wait_for(delivered_all(sandbox, [first]), "delivery via long poll")
        await wait_for(lambda: sandbox.long_polls >= 3, "the long poll answering")
        polls = sandbox.polls
        await asyncio.sleep(0.5)  # ten poll intervals
        assert sandbox.polls - polls <= 1  # at most one that was already on its way
        sandbox.long_poll_offered = False
        await wait_for(lambda: sandbox.polls >= polls + 5, "polling again")
        second = sandbox.add_order("GAME-100")
        await wait_for(delivered_all(sandbox, [second]), "delivery via polling")
    assert_platform_invariants(sandbox)


async def test_busy_polling_goes_on_when_the_scheduled_poll_took_the_orders(
    tmp_path: Path, sandbox: SandboxPlatform, store: Store
) -> None:
    """The scheduled poll takes in the orders just before a busy poll would have: the busy
    poll finds none, yet the stream goes on, so busy polling must too (it stopped, and a
    steady stream piled up until the next scheduled poll)."""
    await stock(store, "GAME-100", 10)
    config = make_config(tmp_path, sandbox.base_url, busy_poll_interval=0.5, poll_interval=60)
    platform = HttpPlatform(platform_settings(sandbox.base_url), sandbox.secret)
    engine = Engine(config.agent, config.skus, store, {"main": platform})
    engine.start_workers()
    try:
        sandbox.add_order("GAME-100")
        assert await engine.poll("main") == 1  # found orders: busy polls follow, 0.5 s apart
        await asyncio.sleep(0.1)
        sandbox.add_order("GAME-100")
        assert await engine.poll("main") == 1  # the scheduled poll, just before the busy one
        await asyncio.sleep(0.6)  # the busy poll has found none meanwhile
        later = sandbox.add_order("GAME-100")
        await wait_for(delivered_all(sandbox, [later]), "the next busy poll takes it in")
    finally:
        await engine.stop_workers(1.0)
        await platform.close()


async def test_busy_polling_follows_a_stream_then_goes_quiet(
    tmp_path: Path, sandbox: SandboxPlatform, store: Store
) -> None:
    """With the next scheduled poll an hour away, a stream of orders is still taken in: each
    poll that finds orders is followed by another one soon. Once polls find nothing, the
    shop is quiet and the agent waits for the schedule."""
    await stock(store, "GAME-100", 200)
    config = make_config(
        tmp_path,
        sandbox.base_url,
        poll_interval=3600,
        busy_poll_interval=0.05,
        reconcile_interval=3600,
    )
    first = sandbox.add_order("GAME-100")  # the start-up poll finds it: busy from there
    streamed: list[str] = []

    async def stream() -> None:
        for _ in range(60):  # an order every 10 ms, so every busy poll finds some
            streamed.append(sandbox.add_order("GAME-100"))
            await asyncio.sleep(0.01)

    async with running_agent(config, store, sandbox):
        await stream()
        await wait_for(delivered_all(sandbox, [first, *streamed]), "the stream, via busy polls")
        await asyncio.sleep(0.3)  # a busy poll or two find nothing: back to the schedule
        late = sandbox.add_order("GAME-100")
        await asyncio.sleep(0.5)
        assert sandbox.orders[late].delivery is None  # waits for the hourly poll
    assert_platform_invariants(sandbox)


async def test_order_cancelled_before_delivery_is_closed_not_parked(
    tmp_path: Path, sandbox: SandboxPlatform, store: Store
) -> None:
    """platform-http v1: a delivery to an order no longer paid answers 409 order_cancelled
    (or order_refunded). The line is closed as the platform says, not parked as a conflict
    that raises a needs-attention alert."""
    waiting = sandbox.add_order("GAME-100")  # no stock yet: backordered
    async with running_agent(make_config(tmp_path, sandbox.base_url), store, sandbox):
        await wait_for(line_state_is(store, waiting, LineState.BACKORDERED), "backordered")
        sandbox.set_status(waiting, "cancelled")  # the buyer cancels while it waits
        await stock(store, "GAME-100", 1)  # stock arrives: the sweep tries to deliver
        await wait_for(line_state_is(store, waiting, LineState.CANCELLED), "closed as cancelled")
    assert sandbox.orders[waiting].delivery is None
    assert (await store.count_by_state()).get(LineState.NEEDS_ATTENTION, 0) == 0


async def test_order_still_paid_after_we_delivered_it_is_flagged(
    tmp_path: Path, sandbox: SandboxPlatform, store: Store
) -> None:
    """A delivery that never reached the platform (answered by someone else, lost by the
    platform) leaves the order paid there while the ledger says delivered: the full re-list
    notices, confirms with the order itself, and parks the line for the merchant."""
    await stock(store, "GAME-100", 3)
    lost, kept = sandbox.add_order("GAME-100"), sandbox.add_order("GAME-100")
    config = make_config(tmp_path, sandbox.base_url, reconcile_interval=1)
    async with running_agent(config, store, sandbox):
        await wait_for(delivered_all(sandbox, [lost, kept]), "deliveries")
        await wait_for(line_state_is(store, lost, LineState.DELIVERED), "recorded")
        # the platform loses the delivery: the buyer never sees the keys
        sandbox.orders[lost].delivery = None
        sandbox.set_status(lost, "paid")
        await wait_for(line_state_is(store, lost, LineState.NEEDS_ATTENTION), "flagged")
    (line,) = await store.find_lines(lost)
    assert line.reason is not None and "still lists this order as paid" in line.reason
    assert (await store.find_lines(kept))[0].state == LineState.DELIVERED
