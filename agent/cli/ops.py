"""Daily operation: init, run, demo, check, status, `notify test`, shell completion."""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from agent import logs
from agent.cli.common import (
    CommandError,
    _,
    add_json_flag,
    bounded_int,
    iso,
    load,
    print_json,
    print_table,
    require_store_key,
    when,
    with_store,
)
from agent.config import Config, PlatformSettings, SupplierSettings
from agent.domain import AgentError, AlertMessage
from agent.i18n import N_, duration
from agent.keybox import StoreKeyError
from agent.phrased import say
from agent.secrets import env_var_for, lookup_secret
from agent.store.base import LedgerError, Store
from agent.suppliers.base import Balance, Supplier
from agent.textsafe import printable

if TYPE_CHECKING:
    from agent.platforms.base import Platform

STATUS_SKU_WIDTH = 32  # display cells; a longer SKU is cut with …


def cmd_run(args: argparse.Namespace) -> int:
    config = load(args)
    logs.configure(config.log.level)
    from agent.runtime import run_daemon

    return asyncio.run(run_daemon(config))


def cmd_init(args: argparse.Namespace) -> int:
    """Creates the ledger (once): its schema, its data keys and its id, recorded beside it.
    --adopt records again the identity file of an existing ledger whose file was lost."""
    from agent.runtime import open_store
    from agent.store.identity import Opening, identity_path

    config = load(args)
    require_store_key(config)
    opening = Opening.RECORD_IDENTITY if args.adopt else Opening.CREATE

    async def create() -> str | None:
        store = open_store(config.store, opening=opening)
        await store.open()
        try:
            return getattr(store, "ledger_id", None)
        finally:
            await store.close()

    ledger_id = asyncio.run(create())
    values = {"id": ledger_id}
    if config.store.path is None:
        text = (
            _("ledger in PostgreSQL: checked, id %(id)s (kept in the database)")
            if args.adopt
            else _("ledger in PostgreSQL: created, id %(id)s (kept in the database)")
        )
    else:
        values |= {"where": str(config.store.path), "file": str(identity_path(config.store.path))}
        text = (
            _("ledger %(where)s: checked, id %(id)s; identity recorded in %(file)s")
            if args.adopt
            else _("ledger %(where)s: created, id %(id)s; identity recorded in %(file)s")
        )
    print(text % values)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from agent.demo import DemoPlan, run_demo

    plan = DemoPlan(steady_orders=args.orders, burst=args.burst)
    return asyncio.run(run_demo(plan, language=_.language))  # the locale's, or the config's


async def _check_credentials(
    adapters: Sequence[PlatformSettings] | Sequence[SupplierSettings],
    build: Callable[[Any], Any],
    probe: Callable[[Any, dict[str, str]], Awaitable[str]],
    failed: str,
) -> int:
    """Each adapter's credentials, by one authenticated call: `probe(adapter, where)` makes it
    and says what it found; `failed` is the msgid said when it is refused. How many failed."""
    problems = 0
    for settings in adapters:
        if not lookup_secret(settings.secret_name):
            continue  # reported with the secrets
        adapter = build(settings)
        where = {"name": settings.name, "url": settings.base_url}
        try:
            print(await probe(adapter, where))
        except AgentError as exc:
            print(_(failed) % (where | {"why": printable(say(exc, _))}))
            problems += 1
        finally:
            await adapter.close()
    return problems


async def _ping(platform: Platform, where: dict[str, str]) -> str:
    await platform.ping()
    return _("platform %(name)s (%(url)s): reachable, auth ok") % where


async def _balance(supplier: Supplier, where: dict[str, str]) -> str:
    balance = await supplier.balance()  # a cheap authenticated call
    shown = printable(f"{balance.amount} {balance.currency}")
    return _("supplier %(name)s (%(url)s): reachable, auth ok (balance %(balance)s)") % (
        where | {"balance": shown}
    )


async def _check_adapters(config: Config) -> int:
    """Each platform's and supplier's credentials; how many were refused."""
    from agent.runtime import build_platform, build_supplier

    return await _check_credentials(
        config.platforms,
        build_platform,
        _ping,
        N_("platform %(name)s (%(url)s): FAILED: %(why)s"),
    ) + await _check_credentials(
        config.suppliers,
        build_supplier,
        _balance,
        N_("supplier %(name)s (%(url)s): FAILED: %(why)s"),
    )


def cmd_check(args: argparse.Namespace) -> int:
    config = load(args)
    print(
        _(
            "config %(file)s: ok (%(platforms)d platform(s), %(suppliers)d supplier(s),"
            " %(skus)d SKU(s))"
        )
        % {
            "file": config.source,
            "platforms": len(config.platforms),
            "suppliers": len(config.suppliers),
            "skus": len(config.skus),
        }
    )
    failures = 0
    for name in config.secret_names():
        if lookup_secret(name):
            print(_("secret %(name)s: present") % {"name": name})
        elif name == config.store.key_secret:
            failures += 1
            try:
                require_store_key(config)
            except CommandError as exc:  # what to do about it, as every command says it
                print(exc)
        else:
            print(
                _("secret %(name)s: MISSING (kami-agent secrets set %(name)s, or %(variable)s)")
                % {"name": name, "variable": env_var_for(name)}
            )
            failures += 1
    ledger = config.store.describe()

    async def probe(store: Store) -> int:
        result = await store.integrity_check()
        shown = _("ok") if result == "ok" else printable(result)
        print(_("store %(ledger)s: %(result)s") % {"ledger": ledger, "result": shown})
        return int(result != "ok")

    if lookup_secret(config.store.key_secret):
        try:
            failures += with_store(config, probe)
        except (LedgerError, StoreKeyError) as exc:
            print(
                _("store %(ledger)s: FAILED: %(why)s")
                % {"ledger": ledger, "why": printable(say(exc, _))}
            )
            failures += 1
    else:
        print(
            _("store %(ledger)s: not checked (its key %(name)s is missing)")
            % {"ledger": ledger, "name": config.store.key_secret}
        )
    # The platforms and suppliers whatever became of the ledger: a merchant checks the
    # credentials before `init` too, and a broken ledger says nothing about them.
    failures += asyncio.run(_check_adapters(config))
    if config.notify:
        print(_("alert channels: not sent to (`kami-agent notify test` sends a test message)"))
    if failures:
        print(_("check: %(n)d problem(s)") % {"n": failures})
    else:
        print(_("check: ok"))
    return 0 if not failures else 1


async def _supplier_balances(config: Config, *, as_json: bool) -> dict[str, Balance]:
    """Each supplier's balance, asked once (it is what they can still sell us); a supplier
    that cannot be asked counts as no capacity, and the line says why (on standard error when
    standard output is JSON)."""
    from agent.runtime import build_supplier

    notes = sys.stderr if as_json else sys.stdout
    balances: dict[str, Balance] = {}
    for settings in config.suppliers:
        if not lookup_secret(settings.secret_name):
            print(
                _("supplier %(name)s: balance unknown (secret %(secret)s missing)")
                % {"name": settings.name, "secret": settings.secret_name},
                file=notes,
            )
            continue
        supplier = build_supplier(settings)
        try:
            balance = await supplier.balance()
        except AgentError as exc:
            print(
                _("supplier %(name)s: balance unknown (%(why)s)")
                % {"name": settings.name, "why": printable(say(exc, _))},
                file=notes,
            )
            continue
        finally:
            await supplier.close()
        balances[settings.name] = balance
        if not as_json:
            shown = printable(f"{balance.amount} {balance.currency}")  # the supplier's text
            print(
                _("supplier %(name)s: balance %(balance)s")
                % {"name": settings.name, "balance": shown}
            )
    return balances


def cmd_status(args: argparse.Namespace) -> int:
    config = load(args)

    async def action(store: Store) -> int:
        from agent.alerts import MAX_ACTIVE_LINES, Forecaster, deadlines_near
        from agent.console.labels import alert_kind_label, severity_label

        balances = await _supplier_balances(config, as_json=args.json)
        forecasts = await Forecaster(config, store, time.time).forecast(balances)
        alerts = await store.open_alerts()
        near = deadlines_near(await store.active_lines(MAX_ACTIVE_LINES), time.time())
        if args.json:
            print_json(
                {
                    "skus": [
                        {
                            "sku": f.sku,
                            "free": f.free,
                            "rate_per_hour": f.rate_per_hour,
                            "time_to_empty_seconds": f.time_to_empty,
                            "pending": f.pending,
                        }
                        for f in forecasts
                    ],
                    "suppliers": {
                        name: {"amount": str(b.amount), "currency": b.currency}
                        for name, b in balances.items()
                    },
                    "alerts": [
                        {
                            "key": a.key,
                            "kind": a.kind,
                            "severity": a.severity,
                            "summary": a.summary,
                            "opened_at": iso(a.opened_at),
                        }
                        for a in alerts
                    ],
                    "deadlines": [
                        {
                            "line": line.id,
                            "platform": line.platform,
                            "order_id": line.order_id,
                            "seconds_left": left,
                        }
                        for left, line in near
                    ],
                }
            )
            return 0
        rows = [
            [
                f.sku,
                str(f.free),
                f"{f.rate_per_hour:.1f}",
                duration(_, f.time_to_empty),
                str(f.pending),
                ", ".join(
                    alert_kind_label(_, a.kind) for a in alerts if a.key.endswith(f":{f.sku}")
                ),
            ]
            for f in forecasts
        ]
        headers = [_("SKU"), _("stock"), _("rate/h"), _("empty in"), _("pending"), _("alerts")]
        print_table(headers, rows, "<>>>><", [STATUS_SKU_WIDTH, None, None, None, None, None])
        if alerts:
            print("\n" + _("open alerts:"))
            print_table(
                [_("opened"), _("severity"), _("summary")],
                [[when(a.opened_at), severity_label(_, a.severity), a.summary] for a in alerts],
            )
        else:
            print("\n" + _("no open alerts"))
        # Live, not from the last alert check: a platform deadline is minutes away.
        if near:
            print(
                "\n" + _("%(n)d orders near their platform's delivery deadline:") % {"n": len(near)}
            )
            print_table(
                [_("platform"), _("order"), _("deadline")],
                [
                    [
                        line.platform,
                        line.order_id,
                        _("MISSED")
                        if left < 0
                        else _("due in %(time)s") % {"time": duration(_, left)},
                    ]
                    for left, line in near[:20]
                ],
            )
        return 0

    return with_store(config, action)


def cmd_notify_test(args: argparse.Namespace) -> int:
    """Sends one test message on every alert channel (or the one named), through the same
    builders the daemon uses, and says for each whether it went out."""
    from agent.notify.factory import build_notifier
    from agent.secrets import resolve_secret

    config = load(args)
    channels = [c for c in config.notify if args.channel in (None, c.name)]
    if not channels:
        if args.channel:
            raise CommandError(
                _("no alert channel [notify.%(name)s] in %(file)s")
                % {"name": args.channel, "file": config.source}
            )
        raise CommandError(
            _("no alert channels in %(file)s (add a [notify.<name>] table)")
            % {"file": config.source}
        )
    message = AlertMessage(
        key="notify_test",
        kind="notify_test",
        event="opened",
        severity="info",
        summary=_("test message from kami-agent on %(host)s: alerts reach this channel")
        % {"host": socket.gethostname()},
        at=time.time(),
        language=config.agent.language,
    )

    async def send_all() -> int:
        failed = 0
        for settings in channels:
            where = {"name": settings.name, "kind": settings.kind}
            try:
                notifier = build_notifier(settings, resolve_secret, timeout=args.timeout)
            except AgentError as exc:
                print(
                    _("notify %(name)s (%(kind)s): FAILED: %(why)s")
                    % (where | {"why": printable(say(exc, _))})
                )
                failed += 1
                continue
            try:
                await notifier.send(message)
                print(_("notify %(name)s (%(kind)s): sent") % where)
            except AgentError as exc:
                print(
                    _("notify %(name)s (%(kind)s): FAILED: %(why)s")
                    % (where | {"why": printable(say(exc, _))})
                )
                failed += 1
            finally:
                await notifier.close()
        return failed

    failed = asyncio.run(send_all())
    if failed:
        print(_("notify test: %(n)d channel(s) failed") % {"n": failed})
    else:
        print(_("notify test: ok"))
    return 0 if not failed else 1


def cmd_completion(args: argparse.Namespace) -> int:
    try:
        import shtab
    except ImportError:
        raise CommandError(
            _("shell completion needs shtab: pip install 'kami-agent[completion]'")
        ) from None
    from agent.cli import build_parser

    print(shtab.complete(build_parser(), shell=args.shell))
    return 0


def add_parsers(sub: Any) -> None:
    init = sub.add_parser("init", help=_("create the ledger (once, after `keys init`)"))
    init.add_argument(
        "--adopt",
        action="store_true",
        help=_("record again the lost identity file of this shop's existing ledger"),
    )
    init.set_defaults(func=cmd_init)
    sub.add_parser("run", help=_("run the daemon in the foreground")).set_defaults(func=cmd_run)
    demo = sub.add_parser("demo", help=_("run against the embedded sandbox platform"))
    demo.add_argument(
        "--orders",
        type=bounded_int(0, 1_000_000),
        default=150,
        help=_("orders in the steady stream"),
    )
    demo.add_argument(
        "--burst", type=bounded_int(0, 1_000_000), default=500, help=_("orders in the burst")
    )
    demo.set_defaults(func=cmd_demo)
    status = sub.add_parser("status", help=_("stock, sales rate, time to empty, open alerts"))
    add_json_flag(status)
    status.set_defaults(func=cmd_status)
    sub.add_parser(
        "check",
        help=_(
            "validate config and secrets; test the ledger, every platform's and supplier's"
            " credentials"
        ),
    ).set_defaults(func=cmd_check)

    notify = sub.add_parser("notify", help=_("alert channels")).add_subparsers(
        dest="notify_cmd", required=True
    )
    test = notify.add_parser("test", help=_("send a test message on every alert channel"))
    test.add_argument("--channel", help=_("only this [notify.<name>] channel"))
    test.add_argument(
        "--timeout",
        type=bounded_int(1, 120, N_("seconds")),
        default=15,
        help=_("seconds per channel"),
    )
    test.set_defaults(func=cmd_notify_test)

    completion = sub.add_parser(
        "completion",
        help=_("print a shell completion script"),
        description=_("e.g. kami-agent completion bash > /etc/bash_completion.d/kami-agent"),
    )
    completion.add_argument("shell", choices=["bash", "zsh", "tcsh"], help=_("your shell"))
    completion.set_defaults(func=cmd_completion)
