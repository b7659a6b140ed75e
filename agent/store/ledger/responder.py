"""The ledger of responder platforms: the platform calls the agent's listener and the reply
carries the keys (agent/listener.py; Eneba's declared stock, a dujiao-next shop buying from
us). Written once for both databases.

Every call that changes the ledger stores its reply, sealed, in the same transaction
(`replies`, keyed by platform, order id and action): committed before the reply is sent, and
a call repeated for the same order and action gets those very bytes again, never a reply
computed anew, so never other keys. The adapters render replies (the wire format is
theirs); these bodies decide what happened and keep it.

Reservations hold keys bound to a line `reserved`; only such a line's keys may go back to
stock (migration 0010's trigger). Keys handed out are voided, naming their line, when the
platform cancels afterwards.
"""

from __future__ import annotations

import asyncio
import enum
import functools
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Concatenate, ParamSpec, TypeVar

from agent.domain import CardItem, LineState, OrderLine
from agent.i18n import N_
from agent.phrased import phrased
from agent.store.base import StoreError
from agent.store.ledger.core import EVENT, FREE_KEYS, LINE_KEYS, LedgerCore, read, write
from agent.store.rows import LINE_COLUMNS, line_from_row
from agent.store.tx import Bulk, Row, Tx

P = ParamSpec("P")
R = TypeVar("R", bound="ResponderLedger")

REPLY_CACHE = 20_000  # replies kept in memory (sealed): a day of a busy shop's retries
INSERT_RESPONDER_LINE = (
    "INSERT INTO orders (platform, order_id, line, sku, quantity, state, amount, currency,"
    " seen_at, updated_at, attempts) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9, 0)"
    " ON CONFLICT (platform, order_id, line) DO NOTHING"
)
# The lines of orders: one order's, or a batch of PROVIDEs' (see ResponderLedger.provide:
# each of a batch's reads and writes runs once over every order of the batch). Lines are
# locked in id order (the same order for every agent: no deadlock between two batches).
ORDERS_LINES = (
    f"SELECT {LINE_COLUMNS} FROM orders WHERE platform = $1 AND order_id = ANY($2::text[])"
    " ORDER BY id{for_update}"
)
STORED = (
    "SELECT order_id, status, key_id, sealed FROM replies WHERE platform = $1 AND action = $2"
    " AND order_id = ANY($3::text[])"
)
STORE_REPLY = Bulk(
    "INSERT INTO replies (platform, order_id, action, status, key_id, sealed, created_at)"
    " VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (platform, order_id, action) DO NOTHING",
    ("text", "text", "text", "int", "int", "bytea", "float8"),
)
LINES_KEYS = (
    "SELECT order_line_id, sku, key_id, sealed, secret_hash FROM card_keys"
    " WHERE order_line_id = ANY($1::bigint[]) ORDER BY order_line_id, slot"
)
MARK_PROVIDED = "UPDATE orders SET state = 'provided', updated_at = $1 WHERE id = ANY($2::bigint[])"
# The platform $2's lines in state $1 taken in before $3, oldest first, $4 at most.
LINES_SEEN = (
    f"SELECT {LINE_COLUMNS} FROM orders WHERE state = $1 AND platform = $2 AND seen_at < $3"
    " ORDER BY id LIMIT $4"
)


@dataclass(frozen=True, slots=True)
class Reply:
    """What a platform call is answered with; `replayed`: it was stored by an earlier call."""

    status: int
    body: bytes
    replayed: bool = False
    # (platform, order id, action, key id, sealed) of the reply as stored; None when the
    # reply was not stored (a refusal that changed nothing).
    stored_as: tuple[str, str, str, int, bytes] | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class Want:
    """One line a reservation asks for: `quantity` keys of `sku`."""

    sku: str
    quantity: int
    amount: str | None = None
    currency: str | None = None


@dataclass(frozen=True, slots=True)
class Handed:
    """A line and the keys bound to it, opened, in slot order."""

    line: OrderLine
    items: tuple[CardItem, ...]


class Cancelled(enum.StrEnum):
    RELEASED = "released"  # reserved: its keys went back to stock
    VOIDED = "voided"  # handed out: its keys are void, naming the line
    ALREADY = "already"  # cancelled before
    UNKNOWN = "unknown"  # no such order


@dataclass(frozen=True, slots=True)
class CallbackItem:
    id: int
    platform: str
    line_id: int
    url: str
    body: bytes
    attempts: int


# A renderer gets what happened and returns the reply (status, body).
Rendered = tuple[int, bytes]


def _label(platform: str, order_id: str, action: str) -> str:
    return f"reply\x1f{platform}\x1f{order_id}\x1f{action}"


def _callback_label(platform: str, line_id: int) -> str:
    return f"callback\x1f{platform}\x1f{line_id}"


@dataclass(slots=True)
class _Provide:
    """One PROVIDE waiting for its batch: the caller awaits `future`."""

    order_id: str
    now: float
    render: Callable[[Sequence[Handed]], Rendered]
    future: asyncio.Future[Reply]


class _Raced(Exception):
    """A batch found a reply stored by another agent between its read and its write: the
    batch is undone and its calls run one by one (each finds that reply)."""


def _answered(
    body: Callable[Concatenate[R, Tx, P], Awaitable[Reply]],
) -> Callable[Concatenate[R, P], Coroutine[Any, Any, Reply]]:
    """A call that changes the ledger: its body runs in one write transaction (`write`) and
    its reply is kept in memory once that has committed (see _remember)."""
    run = write(body)

    @functools.wraps(body)
    async def call(self: R, /, *args: P.args, **kwargs: P.kwargs) -> Reply:
        return self._remember(await run(self, *args, **kwargs))

    return call


class ResponderLedger(LedgerCore):
    # Replies this process stored or read, sealed as stored: a stored reply never changes
    # (inserted once, never updated), so a copy of it is that reply. Retries are answered
    # from here without a ledger call; a miss goes through the ledger.
    _replies: OrderedDict[tuple[str, str, str], tuple[int, int, bytes]] | None = None
    # PROVIDEs waiting for the next batch, by platform (see provide), and the batches
    # under way (a task is kept referenced until it ends).
    _provides: dict[str, list[_Provide]] | None = None
    _batches: set[asyncio.Task[None]] | None = None

    # --- stored replies -----------------------------------------------------------------
    def cached_reply(self, platform: str, order_id: str, action: str) -> Reply | None:
        """The reply stored for this call if this process has seen it (no ledger call)."""
        if self._replies is None:
            return None
        found = self._replies.get((platform, order_id, action))
        if found is None:
            return None
        self._replies.move_to_end((platform, order_id, action))
        status, key_id, sealed = found
        body = self.keybox.open_bytes(_label(platform, order_id, action), key_id, sealed)
        return Reply(status, body, replayed=True)

    def _remember(self, reply: Reply) -> Reply:
        """Keeps a reply the ledger holds (called once the transaction that stored or read it
        has committed: a reply in here is always one the ledger has)."""
        if reply.stored_as is None:
            return reply
        if self._replies is None:
            self._replies = OrderedDict()
        platform, order_id, action, key_id, sealed = reply.stored_as
        self._replies[platform, order_id, action] = (reply.status, key_id, sealed)
        if len(self._replies) > REPLY_CACHE:
            self._replies.popitem(last=False)
        return reply

    async def stored_reply(self, platform: str, order_id: str, action: str) -> Reply | None:
        """The reply stored for this call, if one was (read only: a repeated call is answered
        without the write lock; from memory when this process has seen it)."""
        cached = self.cached_reply(platform, order_id, action)
        if cached is not None:
            return cached
        reply = await self._read_stored(platform, order_id, action)
        return None if reply is None else self._remember(reply)

    @read
    async def _read_stored(self, tx: Tx, platform: str, order_id: str, action: str) -> Reply | None:
        return await self._stored(tx, platform, order_id, action)

    async def _stored(self, tx: Tx, platform: str, order_id: str, action: str) -> Reply | None:
        return (await self._stored_all(tx, platform, action, [order_id])).get(order_id)

    async def _stored_all(
        self, tx: Tx, platform: str, action: str, orders: Sequence[str]
    ) -> dict[str, Reply]:
        """The replies stored for these orders' `action`, opened, by order id."""
        rows = await tx.fetch(STORED, platform, action, orders)
        box = await self._box_for(tx, [r[2] for r in rows])
        replies = {}
        for order, status, key_id, sealed in rows:
            stored_as = (platform, order, action, key_id, bytes(sealed))
            body = box.open_bytes(_label(platform, order, action), key_id, stored_as[4])
            replies[order] = Reply(status, body, True, stored_as)
        return replies

    async def _keep(
        self, tx: Tx, platform: str, order_id: str, action: str, reply: Rendered, now: float
    ) -> Reply:
        """Stores the reply with the transaction; the one stored first if another call of
        the same order and action got in before (a shared ledger)."""
        box = await self._fresh_keybox(tx)
        key_id, sealed = box.seal_bytes(_label(platform, order_id, action), reply[1])
        stored = await tx.execute(
            STORE_REPLY.sql, platform, order_id, action, reply[0], key_id, sealed, now
        )
        if not stored:
            earlier = await self._stored(tx, platform, order_id, action)
            assert earlier is not None
            return earlier
        return Reply(reply[0], reply[1], False, (platform, order_id, action, key_id, sealed))

    async def _take_lines(
        self,
        tx: Tx,
        platform: str,
        order_id: str,
        wants: Sequence[Want],
        state: LineState,
        now: float,
        action: str,
        refusal: str,
    ) -> list[int] | Reply | None:
        """The order's lines taken in, in `state`, each bound to its keys: their ids. None,
        with nothing changed, when a line cannot be filled; the reply stored for `action`
        if another agent took the order in meanwhile (StoreError saying `refusal` if it
        stored none)."""
        taken: list[list[int]] = []
        for want in wants:
            rows = await tx.fetch(FREE_KEYS, want.sku, want.quantity, now)
            if len(rows) < want.quantity:
                return None
            taken.append([r[0] for r in rows])
        binds: list[tuple[int, int, float, int]] = []
        events: list[tuple[int, str, str]] = []
        for number, (want, key_ids) in enumerate(zip(wants, taken, strict=True)):
            line_id = await tx.insert(
                INSERT_RESPONDER_LINE,
                platform,
                order_id,
                number,
                want.sku,
                want.quantity,
                state.value,
                want.amount,
                want.currency,
                now,
            )
            if line_id is None:  # another agent took this order in meanwhile
                stored = await self._stored(tx, platform, order_id, action)
                if stored is None:
                    raise phrased(StoreError, refusal, platform=platform, order=order_id)
                return stored
            binds += [(line_id, slot, now, key) for slot, key in enumerate(key_ids)]
            events.append((line_id, state.value, f"sku={want.sku} keys={want.quantity}{self._by}"))
        await self._bind_keys(
            tx,
            binds,
            N_("%(platform)s order %(order)s: a key was taken while binding (%(bound)s)"),
            platform=platform,
            order=order_id,
        )
        await self._events(tx, events, now)
        return [event[0] for event in events]

    # --- reservations (Eneba's RESERVE, PROVIDE, CANCEL); each call one transaction --------
    @_answered
    async def reserve(
        self,
        tx: Tx,
        platform: str,
        order_id: str,
        wants: Sequence[Want],
        now: float,
        render: Callable[[bool], Rendered],
    ) -> Reply:
        """Binds every line's keys in this one transaction, as lines `reserved`
        (render(True)); or binds nothing at all when any line cannot be filled
        (render(False)). Either reply is stored: the platform was told, so it stays told."""
        if (stored := await self._stored(tx, platform, order_id, "RESERVE")) is not None:
            return stored
        taken = None
        if wants and all(want.quantity > 0 for want in wants):  # else nothing asked for
            taken = await self._take_lines(
                tx,
                platform,
                order_id,
                wants,
                LineState.RESERVED,
                now,
                "RESERVE",
                N_("%(platform)s order %(order)s: reserved without a reply"),
            )
            if isinstance(taken, Reply):
                return taken
        return await self._keep(tx, platform, order_id, "RESERVE", render(taken is not None), now)

    async def provide(
        self,
        platform: str,
        order_id: str,
        now: float,
        render: Callable[[Sequence[Handed]], Rendered],
    ) -> Reply:
        """The order's lines `reserved` -> `provided`, their keys opened for the reply
        (render(lines)); render([]) when the order holds no keys to hand out. Stored: every
        retry gets exactly these keys.

        PROVIDEs arriving together (a sale's callbacks) are answered by one ledger body:
        each statement runs once for the batch, not once per order, and the batch commits
        before any of its replies is returned. A batch that fails is undone and its calls
        run one by one, so one order's trouble is never another's."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Reply] = loop.create_future()
        if self._provides is None:
            self._provides = {}
        waiting = self._provides.get(platform)
        if waiting is None:
            waiting = self._provides[platform] = []
            if self._batches is None:
                self._batches = set()
            task = loop.create_task(self._provide_batch(platform, waiting))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)
        waiting.append(_Provide(order_id, now, render, future))
        return await future

    async def _provide_batch(self, platform: str, waiting: list[_Provide]) -> None:
        """Answers the PROVIDEs in `waiting`: those that came before the ledger ran the
        body (on SQLite, the commit before it), in one body; one by one if that fails."""
        calls: list[_Provide] = []

        def drained() -> list[_Provide]:
            # Taken once, when the body first runs (a body run again after a deadlock
            # answers the same calls); from then on, a PROVIDE starts the next batch.
            if not calls:
                if self._provides is not None and self._provides.get(platform) is waiting:
                    del self._provides[platform]
                calls.extend(waiting)
            return calls

        try:
            try:
                replies = await self._write(lambda tx: self._provide_all(tx, platform, drained()))
            except Exception:
                await asyncio.gather(*(self._provide_one(platform, c) for c in drained()))
                return
            self._answer(drained(), replies)
        finally:
            for call in drained():
                if not call.future.done():
                    call.future.cancel()

    async def _provide_one(self, platform: str, call: _Provide) -> None:
        """One PROVIDE of a batch that failed, in a transaction of its own; run again once
        if it raced another agent's (_Raced): the second run finds that agent's reply."""

        async def body(tx: Tx) -> list[Reply]:
            return await self._provide_all(tx, platform, [call])

        try:
            try:
                replies = await self._write(body)
            except _Raced:
                replies = await self._write(body)
        except Exception as exc:
            if not call.future.done():
                call.future.set_exception(exc)
            return
        self._answer([call], replies)

    def _answer(self, calls: Sequence[_Provide], replies: Sequence[Reply]) -> None:
        """Each call its reply, once the transaction that stored or read them committed."""
        for call, reply in zip(calls, replies, strict=True):
            self._remember(reply)
            if not call.future.done():
                call.future.set_result(reply)

    async def _provide_all(self, tx: Tx, platform: str, calls: Sequence[_Provide]) -> list[Reply]:
        """The PROVIDEs of `calls` in one body, each statement over the whole batch: an
        order's lines `reserved` -> `provided`, their keys opened for the reply
        (render(lines)); render([]) when the order holds no keys to hand out (unknown,
        cancelled, released). The replies, in the calls' order. A second call for an order
        of the batch gets the first's reply, as stored (replayed), as it would one after
        the other. _Raced if another agent stored a reply of the batch meanwhile."""
        orders = list(dict.fromkeys(call.order_id for call in calls))
        lines: dict[str, list[OrderLine]] = {order: [] for order in orders}
        for row in await tx.fetch(ORDERS_LINES, platform, orders):
            line = line_from_row(row)
            lines[line.order_id].append(line)
        # Locked first: a PROVIDE running beside this one waits here, then finds the reply.
        replies = await self._stored_all(tx, platform, "PROVIDE", orders)
        holding = (LineState.RESERVED, LineState.PROVIDED, LineState.DELIVERED)
        handing = [
            order
            for order in orders
            if order not in replies
            and lines[order]
            and all(line.state in holding for line in lines[order])
        ]
        for order in handing:
            lines[order].sort(key=lambda line: line.line)
        items = await self._lines_items(tx, [line for order in handing for line in lines[order]])
        first: dict[str, _Provide] = {}
        for call in calls:
            first.setdefault(call.order_id, call)
        marks: list[int] = []
        events: list[tuple[int, float, str, str]] = []
        rendered: dict[str, Rendered] = {}
        for order in orders:
            if order in replies:
                continue
            call = first[order]
            if order not in handing:
                rendered[order] = call.render([])
                continue
            handed = [Handed(line, items[line.id]) for line in lines[order]]
            for line in lines[order]:
                if line.state == LineState.RESERVED:
                    marks.append(line.id)
                    events.append((line.id, call.now, "provided", f"keys handed over{self._by}"))
            rendered[order] = call.render(handed)
        if marks:
            # One statement for the batch, at its latest call's time.
            await tx.execute(MARK_PROVIDED, max(call.now for call in calls), marks)
            await tx.executemany(EVENT, events)
        if rendered:
            box = await self._fresh_keybox(tx)
            rows = []
            for order, (status, body) in rendered.items():
                key_id, sealed = box.seal_bytes(_label(platform, order, "PROVIDE"), body)
                now = first[order].now
                rows.append((platform, order, "PROVIDE", status, key_id, sealed, now))
                replies[order] = Reply(
                    status, body, False, (platform, order, "PROVIDE", key_id, sealed)
                )
            if await tx.executemany(STORE_REPLY, rows) != len(rows):
                raise _Raced(f"{platform}: a PROVIDE of the batch was answered meanwhile")
        answered: list[Reply] = []
        for call in calls:
            reply = replies[call.order_id]
            if call is not first[call.order_id] and not reply.replayed:
                reply = Reply(reply.status, reply.body, True, reply.stored_as)
            answered.append(reply)
        return answered

    async def _lines_items(
        self, tx: Tx, lines: Sequence[OrderLine]
    ) -> dict[int, tuple[CardItem, ...]]:
        """The keys bound to each of these lines, opened, in slot order, by line id (one
        read); StoreError if a line holds other than its quantity of keys."""
        if not lines:
            return {}
        rows: dict[int, list[Row]] = {line.id: [] for line in lines}
        for row in await tx.fetch(LINES_KEYS, [line.id for line in lines]):
            rows[row[0]].append(row[1:])
        for line in lines:
            if len(rows[line.id]) != line.quantity:
                raise phrased(
                    StoreError,
                    N_("order line %(line)s holds %(held)s keys for %(quantity)s"),
                    line=line.id,
                    held=len(rows[line.id]),
                    quantity=line.quantity,
                )
        opened = iter(await self._open_rows(tx, [r for line in lines for r in rows[line.id]]))
        return {line.id: tuple(next(opened) for _ in rows[line.id]) for line in lines}

    @_answered
    async def cancel_order(
        self,
        tx: Tx,
        platform: str,
        order_id: str,
        reason: str,
        now: float,
        render: Callable[[Cancelled], Rendered],
    ) -> Reply:
        """The platform cancels the order: keys of lines still `reserved` go back to stock;
        keys handed out (`provided`, `delivered`) are voided with the reason, naming their
        line. The reply is stored."""
        lines = [line_from_row(r) for r in await tx.fetch(ORDERS_LINES, platform, [order_id])]
        if (stored := await self._stored(tx, platform, order_id, "CANCEL")) is not None:
            return stored
        outcome = Cancelled.UNKNOWN if not lines else Cancelled.ALREADY
        for line in lines:
            if line.state in (LineState.RESERVED, LineState.PROVIDED, LineState.DELIVERED):
                outcome = await self._cancel_line(tx, line, reason, now)
        return await self._keep(tx, platform, order_id, "CANCEL", render(outcome), now)

    async def _cancel_line(self, tx: Tx, line: OrderLine, reason: str, now: float) -> Cancelled:
        """A reserved line's keys back to stock (while the line is still `reserved`: the
        trigger lets only those go); a line's keys handed out voided, naming the line. Then
        the line cancelled."""
        if line.state == LineState.RESERVED:
            count = await tx.execute(
                "UPDATE card_keys SET state = 'free', order_line_id = NULL, slot = NULL,"
                " bound_at = NULL WHERE order_line_id = $1",
                line.id,
            )
            detail = f"{count} keys back to stock: {reason}"
            await self._event(tx, line.id, "released", detail, now)
            outcome = Cancelled.RELEASED
        else:
            why = (
                f"{line.platform} order {line.order_id} cancelled after its keys were handed"
                f" out: {reason}"
            )
            count = await tx.execute(
                "UPDATE card_keys SET state = 'void', void_reason = $1,"
                " was_bound_to = order_line_id, order_line_id = NULL, slot = NULL"
                " WHERE order_line_id = $2",
                why,
                line.id,
            )
            await self._event(tx, line.id, "keys_voided", f"{count} keys voided: {reason}", now)
            outcome = Cancelled.VOIDED
        await tx.execute(
            "UPDATE orders SET state = 'cancelled', reason = $1, updated_at = $2 WHERE id = $3",
            reason,
            now,
            line.id,
        )
        return outcome

    @write
    async def release_expired(
        self, tx: Tx, platform: str, reserved_before: float, now: float, limit: int = 500
    ) -> int:
        """Releases reservations taken before `reserved_before` and never asked for (the
        buyer never paid): their keys back to stock. How many lines."""
        rows = await tx.fetch(
            LINES_SEEN + "{skip_locked}", LineState.RESERVED.value, platform, reserved_before, limit
        )
        for line in map(line_from_row, rows):
            await self._cancel_line(tx, line, "reservation not paid in time", now)
        return len(rows)

    @read
    async def lines_in(
        self, tx: Tx, platform: str, state: LineState, seen_before: float, limit: int
    ) -> list[OrderLine]:
        """The platform's lines in `state` taken in before `seen_before`, oldest first."""
        rows = await tx.fetch(LINES_SEEN, state.value, platform, seen_before, limit)
        return [line_from_row(r) for r in rows]

    # --- orders placed with us (a dujiao-next shop) ---------------------------------------
    @_answered
    async def place_order(
        self,
        tx: Tx,
        platform: str,
        order_id: str,
        want: Want,
        now: float,
        render: Callable[[Handed | None], Rendered],
        callback: tuple[str, Callable[[Handed], bytes]] | None = None,
    ) -> Reply:
        """An order paid with us: one line bound to its keys and handed over at once
        (`provided`), the reply (render(handed)) and the callback owed (its URL and body)
        stored in the same transaction. Too few keys: render(None), nothing stored (nothing
        changed, and a later try may find stock)."""
        if (stored := await self._stored(tx, platform, order_id, "ORDER")) is not None:
            return stored
        taken = await self._take_lines(
            tx,
            platform,
            order_id,
            [want],
            LineState.PROVIDED,
            now,
            "ORDER",
            N_("%(platform)s order %(order)s: placed without a reply"),
        )
        if taken is None:
            rendered = render(None)
            return Reply(rendered[0], rendered[1])
        if isinstance(taken, Reply):
            return taken
        line = await self._fetch_line(tx, taken[0])
        handed = Handed(line, (await self._lines_items(tx, [line]))[line.id])
        if callback is not None:
            url, body = callback
            box = await self._fresh_keybox(tx)
            key_id, sealed = box.seal_bytes(_callback_label(platform, line.id), body(handed))
            await tx.execute(
                "INSERT INTO callbacks (platform, order_line_id, url, key_id, sealed, created_at)"
                " VALUES ($1, $2, $3, $4, $5, $6)",
                platform,
                line.id,
                url,
                key_id,
                sealed,
                now,
            )
        return await self._keep(tx, platform, order_id, "ORDER", render(handed), now)

    @read
    async def handed_line(self, tx: Tx, platform: str, line_id: int) -> Handed | None:
        """The platform's line and its keys (none when it holds none now)."""
        row = await tx.fetchrow(
            f"SELECT {LINE_COLUMNS} FROM orders WHERE id = $1 AND platform = $2",
            line_id,
            platform,
        )
        if row is None:
            return None
        line = line_from_row(row)
        rows = await tx.fetch(LINE_KEYS, line.id)
        return Handed(line, tuple(await self._open_rows(tx, [r[1:] for r in rows])))

    # --- the callback outbox ------------------------------------------------------------
    @read
    async def due_callbacks(
        self, tx: Tx, platform: str, now: float, limit: int
    ) -> list[CallbackItem]:
        rows = await tx.fetch(
            "SELECT id, order_line_id, url, key_id, sealed, attempts FROM callbacks"
            " WHERE platform = $1 AND sent_at IS NULL AND dead_at IS NULL"
            " AND next_attempt_at <= $2 ORDER BY id LIMIT $3",
            platform,
            now,
            limit,
        )
        box = await self._box_for(tx, [r[3] for r in rows])
        return [
            CallbackItem(
                r[0],
                platform,
                r[1],
                r[2],
                box.open_bytes(_callback_label(platform, r[1]), r[3], bytes(r[4])),
                r[5],
            )
            for r in rows
        ]

    @write
    async def callback_done(
        self,
        tx: Tx,
        item: CallbackItem,
        now: float,
        *,
        error: str | None = None,
        retry_at: float | None = None,
    ) -> None:
        """Sent (no error): the line is delivered. Failed: tried again at `retry_at`, or
        given up (dead) without one."""
        if error is None:
            await tx.execute(
                "UPDATE callbacks SET sent_at = $1, attempts = attempts + 1, last_error = NULL"
                " WHERE id = $2",
                now,
                item.id,
            )
            await self._event(
                tx, item.line_id, "callback_sent", f"attempt {item.attempts + 1}", now
            )
            await self._handed_over(tx, item.line_id, "the platform acknowledged the callback", now)
            return
        await tx.execute(
            "UPDATE callbacks SET attempts = attempts + 1, last_error = $1,"
            " next_attempt_at = COALESCE($2, next_attempt_at), dead_at = $3 WHERE id = $4",
            error[:500],
            retry_at,
            now if retry_at is None else None,
            item.id,
        )

    @write
    async def handed_over(self, tx: Tx, line_id: int, detail: str, now: float) -> bool:
        """A `provided` line is `delivered` (the platform has its keys); whether it moved."""
        return await self._handed_over(tx, line_id, detail, now)

    async def _handed_over(self, tx: Tx, line_id: int, detail: str, now: float) -> bool:
        moved = await tx.execute(
            "UPDATE orders SET state = 'delivered', delivered_at = $1, updated_at = $1"
            " WHERE id = $2 AND state = 'provided'",
            now,
            line_id,
        )
        if moved:
            await self._event(tx, line_id, "delivered", detail, now)
        return bool(moved)
