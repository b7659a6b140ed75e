"""`kami-agent orders`: list, show, retry, resend — each line addressed without ambiguity.

A bare reference is a platform order id, never a ledger row: with numeric order ids, "123"
used to find order 123 or, when none, row 123, and acted on the wrong order. A ledger row is
named `--line N` (or `#N`, quoted in a shell), an order on one platform `--platform P ID` or
`P:ID`. A reference matching several lines is refused with the candidates listed.
"""

from __future__ import annotations

import argparse
import getpass
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from agent.aftersales import AfterSales, operator_action, with_platforms
from agent.cli.common import (
    MAX_LIMIT,
    CommandError,
    _,
    add_json_flag,
    bounded_int,
    iso,
    load,
    print_json,
    print_table,
    when,
)
from agent.cli.common import with_store as run_with_store
from agent.config import Config
from agent.console.labels import event_label, state_label
from agent.domain import CardItem, LineState, OrderLine
from agent.i18n import ENGLISH, N_
from agent.reasons import say_reason
from agent.store.base import Store
from agent.textsafe import printable

MAX_ROW_ID = 2**63 - 1
T = TypeVar("T")


def _quantity(line: OrderLine) -> str:
    # 0 is no quantity a line can have: a parked order whose quantity was never taken in
    return str(line.quantity) if line.quantity > 0 else "?"


def said_state(state: str) -> str:
    """A line's state as the merchant reads it: in English the code `--state` takes (what the
    English output has always said), in Chinese the console's name for it."""
    return str(state) if _.language == ENGLISH else state_label(_, state)


def said_event(kind: str) -> str:
    """An audit trail entry's kind, likewise: the ledger's code in English, else its name."""
    return kind if _.language == ENGLISH else event_label(_, kind)


def print_lines(lines: Sequence[OrderLine]) -> None:
    """A table lined up by display width (Chinese SKUs and reasons); the state as said_state
    says it; the agent's own reasons in the merchant's language (agent/reasons.py). Ids,
    SKUs and reasons come from platforms: print_table escapes them."""
    headers = [_("line"), _("platform"), _("order"), _("sku"), _("qty"), _("state")]
    headers += [_("tries"), _("seen (UTC)"), _("reason")]
    rows = [
        [
            f"#{ln.id}",
            ln.platform,
            ln.order_id,
            ln.sku,
            _quantity(ln),
            said_state(ln.state),
            str(ln.attempts),
            when(ln.seen_at),
            say_reason(ln.reason, _),
        ]
        for ln in lines
    ]
    print_table(headers, rows, "><<<><><<", [None, 10, None, 24, None, None, None, None, None])


def line_json(ln: OrderLine) -> dict[str, Any]:
    return {
        "line": ln.id,
        "platform": ln.platform,
        "order_id": ln.order_id,
        "order_line": ln.line,
        "sku": ln.sku,
        "quantity": ln.quantity if ln.quantity > 0 else None,
        "state": str(ln.state),
        "reason": ln.reason,
        "attempts": ln.attempts,
        "seen_at": iso(ln.seen_at),
        "delivered_at": iso(ln.delivered_at),
        "paid_at": ln.paid_at,
        "deliver_by": ln.deliver_by,
        "buyer_contact": ln.buyer_contact,
    }


def _describe(ln: OrderLine) -> str:
    return _("--line %(id)d (%(order)s line %(line)d, %(sku)s, %(state)s)") % {
        "id": ln.id,
        "order": f"{printable(ln.platform)}:{printable(ln.order_id)}",
        "line": ln.line,
        "sku": printable(ln.sku),
        "state": said_state(ln.state),
    }


@dataclass(frozen=True)
class Ref:
    """What the merchant named: a ledger row, or an order id (on one platform or any)."""

    row: int | None = None
    order_id: str | None = None
    platform: str | None = None
    text: str = ""


def parse_ref(ref: str | None, line: int | None, platform: str | None) -> Ref:
    if line is not None:
        if ref is not None:
            raise CommandError(
                _("name the order line either with --line N or with an id, not both")
            )
        return Ref(row=line, text=f"--line {line}")
    if ref is None:
        raise CommandError(_("name the order: ID, PLATFORM:ID, --platform P ID or --line N"))
    if ref.startswith("#") and platform is None:
        digits = ref[1:]
        if not digits.isdigit() or int(digits) > MAX_ROW_ID:
            raise CommandError(
                _("%(ref)r: a ledger line is # and a number, like #12") % {"ref": printable(ref)}
            )
        return Ref(row=int(digits), text=ref)
    return Ref(order_id=ref, platform=platform, text=ref)


async def resolve(store: Store, ref: Ref, platforms: Sequence[str]) -> list[OrderLine]:
    """Every line the reference names (at least one), else CommandError."""
    if ref.row is not None:
        line = await store.get_line(ref.row)
        if line is None:
            raise CommandError(_("no ledger line %(n)d") % {"n": ref.row})
        return [line]
    assert ref.order_id is not None
    candidates: list[OrderLine] = []
    if ref.platform is not None:
        found = await store.find_lines(ref.order_id)
        candidates = [c for c in found if c.order_id == ref.order_id]
        candidates = [c for c in candidates if c.platform == ref.platform]
    else:
        # find_lines falls back to a row id when no order matches: only real order ids count
        found = await store.find_lines(ref.order_id)
        candidates = [c for c in found if c.order_id == ref.order_id]
        prefix, sep, rest = ref.order_id.partition(":")
        if sep and rest and prefix in platforms:
            scoped = await store.find_lines(rest)
            candidates += [c for c in scoped if c.order_id == rest and c.platform == prefix]
    if candidates:
        return candidates
    hint = ""
    if ref.platform is None and ref.order_id.isdigit() and int(ref.order_id) <= MAX_ROW_ID:
        row = await store.get_line(int(ref.order_id))
        if row is not None:
            hint = _("; ledger line %(n)d is another thing: to mean it, write %(ref)s") % {
                "n": row.id,
                "ref": _describe(row),
            }
    order = printable(ref.order_id)
    if ref.platform:
        text = _("no order %(order)r on platform %(platform)s in the ledger%(hint)s") % {
            "order": order,
            "platform": printable(ref.platform),
            "hint": hint,
        }
    else:
        text = _("no order %(order)r in the ledger%(hint)s") % {"order": order, "hint": hint}
    raise CommandError(text)


def _one(candidates: Sequence[OrderLine], ref: Ref) -> OrderLine:
    if len(candidates) == 1:
        return candidates[0]
    listed = "; ".join(_describe(c) for c in candidates[:10])
    if len(candidates) > 10:
        listed += _("; and %(n)d more") % {"n": len(candidates) - 10}
    raise CommandError(
        _("%(ref)r names %(n)d order lines: %(lines)s. Name one with --line N")
        % {"ref": printable(ref.text), "n": len(candidates), "lines": listed}
    )


def _one_order(candidates: Sequence[OrderLine], ref: Ref) -> Sequence[OrderLine]:
    """The lines of one platform order (show may show them all), else refused."""
    if len({(c.platform, c.order_id) for c in candidates}) == 1:
        return candidates
    return [_one(candidates, ref)]


def cmd_list(args: argparse.Namespace) -> int:
    config = load(args)
    state = LineState(args.state) if args.state else None

    async def action(store: Store) -> int:
        lines = await store.list_lines(state, args.limit)
        if args.json:
            print_json([line_json(ln) for ln in lines])
        elif not lines:
            # An empty table says nothing; say whether the filter or the ledger is empty.
            if state is None:
                print(_("no order lines in the ledger yet"))
            else:
                print(_("no order lines are %(state)s") % {"state": said_state(state.value)})
        else:
            print_lines(lines)
        return 0

    return run_with_store(config, action)


def cmd_show(args: argparse.Namespace) -> int:
    config = load(args)
    ref = parse_ref(args.id, args.line, args.platform)
    names = [p.name for p in config.platforms]

    async def action(store: Store) -> int:
        lines = _one_order(await resolve(store, ref, names), ref)
        # Written in each line's audit trail before any key is printed, as the console does.
        revealed = {ln.id: await reveal_keys(store, ln) for ln in lines} if args.reveal else {}
        if args.json:
            shown = []
            for ln in lines:
                events = [
                    {"at": iso(e.at), "kind": e.kind, "detail": e.detail}
                    for e in await store.events(ln.id)
                ]
                extra: dict[str, Any] = {}
                if ln.id in revealed:
                    extra["keys"] = [{"code": k.code, "secret": k.secret} for k in revealed[ln.id]]
                shown.append({**line_json(ln), "events": events, **extra})
            print_json(shown)
            return 0
        print_lines(lines)
        for line in lines:
            print(
                "\n"
                + _(
                    "line #%(id)d: platform %(platform)s, order line %(line)d, buyer %(buyer)s,"
                    " paid %(paid)s, delivered %(delivered)s"
                )
                % {
                    "id": line.id,
                    "platform": printable(line.platform),
                    "line": line.line,
                    "buyer": printable(line.buyer_contact or "-"),
                    "paid": printable(line.paid_at or "-"),
                    "delivered": when(line.delivered_at),
                }
            )
            print(_("audit trail:"))
            print_table(
                [_("at (UTC)"), _("event"), _("detail")],
                [
                    [when(e.at), said_event(e.kind), say_reason(e.detail, _)]
                    for e in await store.events(line.id)
                ],
            )
            if line.id in revealed:
                print(_("keys (this view is recorded in the audit trail):"))
                print_table(
                    [_("card number"), _("secret")],
                    [[k.code or "-", k.secret] for k in revealed[line.id]],
                )
        return 0

    return run_with_store(config, action)


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry and no LOGNAME/USER: a container's uid
        return f"uid {os.getuid()}"


async def reveal_keys(store: Store, line: OrderLine) -> tuple[CardItem, ...]:
    """The keys bound to `line`, after the audit trail records who asked (the OS user) and
    when: the console's reveal (agent/console/actions.py) with the same event kind."""
    items = await store.bound_items(line.id)
    await store.add_event(
        line.id,
        "keys_revealed",
        f"{len(items)} key(s) shown by `kami-agent orders show --reveal`, OS user"
        f" {printable(_os_user())}",
        time.time(),
    )
    return items


async def with_aftersales(
    config: Config, store: Store, act: Callable[[AfterSales], Awaitable[T]]
) -> T:
    """`act` with the after-sales actions, the platforms they need built on first use."""
    return await with_platforms(config, store, time.time, act)


def _operator_action(name: str) -> Callable[[argparse.Namespace], int]:
    def command(args: argparse.Namespace) -> int:
        config = load(args)
        ref = parse_ref(args.id, args.line, args.platform)
        names = [p.name for p in config.platforms]

        async def action(store: Store) -> int:
            line = _one(await resolve(store, ref, names), ref)
            # As the console and the bot do it: a retry reads a parked order again from its
            # platform and screens it as at intake.
            updated = await operator_action(config, store, time.time, name, line.id)
            print(
                _(
                    "order %(order)s (line #%(line)d): now %(state)s; the running agent picks it"
                    " up on its next sweep"
                )
                % _order_now(updated)
            )
            return 0

        return run_with_store(config, action)

    return command


def _aftersales_action(name: str) -> Callable[[argparse.Namespace], int]:
    """refund / replace-key: one line, through its platform, with the merchant's reason."""

    def command(args: argparse.Namespace) -> int:
        config = load(args)
        ref = parse_ref(args.id, args.line, args.platform)
        names = [p.name for p in config.platforms]

        async def action(store: Store) -> int:
            line = _one(await resolve(store, ref, names), ref)
            if name == "refund":
                updated = await with_aftersales(
                    config, store, lambda a: a.refund(line, args.reason)
                )
            else:
                updated = await with_aftersales(
                    config, store, lambda a: a.replace_key(line, args.reason, args.slot)
                )
            print(_("order %(order)s (line #%(line)d): now %(state)s") % _order_now(updated))
            return 0

        return run_with_store(config, action)

    return command


def _order_now(line: OrderLine) -> dict[str, object]:
    return {
        "order": f"{printable(line.platform)}:{printable(line.order_id)}",
        "line": line.id,
        "state": said_state(line.state),
    }


def _sentence(text: str) -> str:
    """A help line as a description's sentence: capitalised, with its full stop (Chinese has
    no capitals and ends with 。)."""
    if text.isascii():
        return f"{text[0].upper()}{text[1:]}."
    return f"{text}。"


def _add_target(p: Any) -> None:
    p.add_argument("id", nargs="?", help=_("platform order id, PLATFORM:ID, or '#N'"))
    p.add_argument("--platform", help=_("the platform the order id belongs to"))
    p.add_argument(
        "--line", type=bounded_int(1, MAX_ROW_ID), help=_("the ledger line (the # column)")
    )


def add_parsers(sub: Any) -> None:
    orders = sub.add_parser("orders", help=_("orders in the ledger")).add_subparsers(
        dest="orders_cmd", required=True
    )
    lst = orders.add_parser("list", help=_("recent order lines"))
    lst.add_argument(
        "--state",
        choices=[s.value for s in LineState],
        help=_("only lines in this state (its code, as --json shows it)"),
    )
    lst.add_argument(
        "--limit",
        type=bounded_int(1, MAX_LIMIT, N_("lines")),
        default=50,
        help=_("at most this many lines, newest first (default: 50)"),
    )
    add_json_flag(lst)
    lst.set_defaults(func=cmd_list)
    naming = _(
        "Name it by platform order id (ID or PLATFORM:ID or --platform P ID) or by ledger line"
        " (--line N, or '#N')."
    )
    for name, func, text in (
        ("show", cmd_show, _("an order and its audit trail")),
        ("retry", _operator_action("retry"), _("send a needs_attention order back to work")),
        ("resend", _operator_action("resend"), _("deliver the same keys again")),
    ):
        p = orders.add_parser(name, help=text, description=f"{_sentence(text)} {naming}")
        _add_target(p)
        if name == "show":
            add_json_flag(p)
            p.add_argument(
                "--reveal",
                action="store_true",
                help=_("also print the order's keys (recorded in its audit trail: who, when)"),
            )
        p.set_defaults(func=func)
    for name, text in (
        ("refund", _("refund an order through its platform; its keys stay bound")),
        ("replace-key", _("replace a bad key of a delivered order with a fresh one")),
    ):
        p = orders.add_parser(name, help=text, description=_sentence(text))
        _add_target(p)
        p.add_argument("--reason", required=True, help=_("why (kept in the audit trail)"))
        if name == "replace-key":
            p.add_argument(
                "--slot",
                type=bounded_int(0, 10_000),
                help=_("which key of the order (0 = first); needed when it holds several"),
            )
        p.set_defaults(func=_aftersales_action(name))
