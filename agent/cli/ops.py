"""Daily operation: init, run, demo, check, status, `notify test`, shell completion."""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import time
from typing import Any

from agent import logs
from agent.cli.common import (
    CommandError,
    add_json_flag,
    bounded_int,
    iso,
    load,
    print_json,
    when,
    with_store,
)
from agent.config import Config
from agent.domain import AgentError, AlertMessage
from agent.keybox import StoreKeyError
from agent.secrets import env_var_for, lookup_secret
from agent.store.base import LedgerError, Store
from agent.suppliers.base import Balance
from agent.textsafe import printable


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
    opening = Opening.RECORD_IDENTITY if args.adopt else Opening.CREATE

    async def create() -> str | None:
        store = open_store(config.store, opening=opening)
        await store.open()
        try:
            return getattr(store, "ledger_id", None)
        finally:
            await store.close()

    ledger_id = asyncio.run(create())
    where = str(config.store.path) if config.store.path is not None else "in PostgreSQL"
    beside = (
        f"; identity recorded in {identity_path(config.store.path)}"
        if config.store.path is not None
        else " (kept in the database)"
    )
    done = "checked" if args.adopt else "created"
    print(f"ledger {where}: {done}, id {ledger_id}{beside}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from agent.demo import DemoPlan, run_demo

    plan = DemoPlan(steady_orders=args.orders, burst=args.burst)
    return asyncio.run(run_demo(plan))


async def _check_suppliers(config: Config) -> int:
    """Each supplier's credentials, by asking its balance (a cheap authenticated call)."""
    from agent.runtime import build_supplier

    problems = 0
    for settings in config.suppliers:
        if not lookup_secret(settings.secret_name):
            continue  # reported with the secrets
        supplier = build_supplier(settings)
        try:
            balance = await supplier.balance()
            shown = printable(f"{balance.amount} {balance.currency}")
            print(
                f"supplier {settings.name} ({settings.base_url}): reachable, auth ok"
                f" (balance {shown})"
            )
        except AgentError as exc:
            print(f"supplier {settings.name} ({settings.base_url}): FAILED: {printable(str(exc))}")
            problems += 1
        finally:
            await supplier.close()
    return problems


def cmd_check(args: argparse.Namespace) -> int:
    config = load(args)
    print(
        f"config {config.source}: ok ({len(config.platforms)} platform(s), "
        f"{len(config.suppliers)} supplier(s), {len(config.skus)} SKU(s))"
    )
    failures = 0
    for name in config.secret_names():
        if lookup_secret(name):
            print(f"secret {name}: present")
        else:
            print(f"secret {name}: MISSING (kami-agent secrets set {name}, or {env_var_for(name)})")
            failures += 1

    async def probe(store: Store) -> int:
        problems = 0
        result = await store.integrity_check()
        print(f"store {config.store.describe()}: {result}")
        problems += result != "ok"
        from agent.runtime import build_platform

        for settings in config.platforms:
            if not lookup_secret(settings.secret_name):
                continue
            platform = build_platform(settings)
            try:
                await platform.ping()
                print(f"platform {settings.name} ({settings.base_url}): reachable, auth ok")
            except AgentError as exc:
                text = printable(str(exc))
                print(f"platform {settings.name} ({settings.base_url}): FAILED: {text}")
                problems += 1
            finally:
                await platform.close()
        return problems + await _check_suppliers(config)

    if lookup_secret(config.store.key_secret):
        try:
            failures += with_store(config, probe)
        except (LedgerError, StoreKeyError) as exc:
            print(f"store {config.store.describe()}: FAILED: {printable(str(exc))}")
            failures += 1
            failures += asyncio.run(_check_suppliers(config))
    else:
        print(
            f"store {config.store.describe()}: not checked"
            f" (its key {config.store.key_secret} is missing)"
        )
        failures += asyncio.run(_check_suppliers(config))
    if config.notify:
        print("alert channels: not sent to (`kami-agent notify test` sends a test message)")
    print("check: ok" if not failures else f"check: {failures} problem(s)")
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
            missing = settings.secret_name
            print(
                f"supplier {settings.name}: balance unknown (secret {missing} missing)", file=notes
            )
            continue
        supplier = build_supplier(settings)
        try:
            balance = await supplier.balance()
        except AgentError as exc:
            print(
                f"supplier {settings.name}: balance unknown ({printable(str(exc))})",
                file=notes,
            )
            continue
        finally:
            await supplier.close()
        balances[settings.name] = balance
        if not as_json:
            shown = printable(f"{balance.amount} {balance.currency}")  # the supplier's text
            print(f"supplier {settings.name}: balance {shown}")
    return balances


def cmd_status(args: argparse.Namespace) -> int:
    config = load(args)

    async def action(store: Store) -> int:
        from agent.alerts import MAX_ACTIVE_LINES, Forecaster, deadlines_near
        from agent.forecast import format_duration

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
        print(f"{'SKU':<20} {'stock':>8} {'rate/h':>8} {'empty in':>10} {'pending':>8}  alerts")
        for f in forecasts:
            mine = printable(", ".join(a.kind for a in alerts if a.key.endswith(f":{f.sku}")))
            print(
                f"{printable(f.sku)[:20]:<20} {f.free:>8} {f.rate_per_hour:>8.1f} "
                f"{format_duration(f.time_to_empty):>10} {f.pending:>8}  {mine}"
            )
        if alerts:
            print("\nopen alerts:")
            for alert in alerts:
                severity, summary = printable(alert.severity), printable(alert.summary)
                print(f"  {when(alert.opened_at)}  {severity:<8} {summary}")
        else:
            print("\nno open alerts")
        # Live, not from the last alert check: a platform deadline is minutes away.
        if near:
            print(f"\n{len(near)} orders near their platform's delivery deadline:")
            for left, line in near[:20]:
                due = "MISSED" if left < 0 else f"due in {format_duration(left)}"
                print(f"  {printable(line.platform)} {printable(line.order_id)}  {due}")
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
            raise CommandError(f"no alert channel [notify.{args.channel}] in {config.source}")
        raise CommandError(f"no alert channels in {config.source} (add a [notify.<name>] table)")
    message = AlertMessage(
        key="notify_test",
        kind="notify_test",
        event="opened",
        severity="info",
        summary=f"test message from kami-agent on {socket.gethostname()}: alerts reach this"
        " channel",
        at=time.time(),
    )

    async def send_all() -> int:
        failed = 0
        for settings in channels:
            label = f"notify {settings.name} ({settings.kind})"
            try:
                notifier = build_notifier(settings, resolve_secret, timeout=args.timeout)
            except AgentError as exc:
                print(f"{label}: FAILED: {printable(str(exc))}")
                failed += 1
                continue
            try:
                await notifier.send(message)
                print(f"{label}: sent")
            except AgentError as exc:
                print(f"{label}: FAILED: {printable(str(exc))}")
                failed += 1
            finally:
                await notifier.close()
        return failed

    failed = asyncio.run(send_all())
    print("notify test: ok" if not failed else f"notify test: {failed} channel(s) failed")
    return 0 if not failed else 1


def cmd_completion(args: argparse.Namespace) -> int:
    try:
        import shtab
    except ImportError:
        raise CommandError(
            "shell completion needs shtab: pip install 'kami-agent[completion]'"
        ) from None
    from agent.cli import build_parser

    print(shtab.complete(build_parser(), shell=args.shell))
    return 0


def add_parsers(sub: Any) -> None:
    init = sub.add_parser("init", help="create the ledger (once, after `keys init`)")
    init.add_argument(
        "--adopt",
        action="store_true",
        help="record again the lost identity file of this shop's existing ledger",
    )
    init.set_defaults(func=cmd_init)
    sub.add_parser("run", help="run the daemon in the foreground").set_defaults(func=cmd_run)
    demo = sub.add_parser("demo", help="run against the embedded sandbox platform")
    demo.add_argument(
        "--orders", type=bounded_int(0, 1_000_000), default=150, help="orders in the steady stream"
    )
    demo.add_argument(
        "--burst", type=bounded_int(0, 1_000_000), default=500, help="orders in the burst"
    )
    demo.set_defaults(func=cmd_demo)
    status = sub.add_parser("status", help="stock, sales rate, time to empty, open alerts")
    add_json_flag(status)
    status.set_defaults(func=cmd_status)
    sub.add_parser(
        "check",
        help="validate config and secrets; test the ledger, every platform's and supplier's"
        " credentials",
    ).set_defaults(func=cmd_check)

    notify = sub.add_parser("notify", help="alert channels").add_subparsers(
        dest="notify_cmd", required=True
    )
    test = notify.add_parser("test", help="send a test message on every alert channel")
    test.add_argument("--channel", help="only this [notify.<name>] channel")
    test.add_argument(
        "--timeout", type=bounded_int(1, 120, "seconds"), default=15, help="seconds per channel"
    )
    test.set_defaults(func=cmd_notify_test)

    completion = sub.add_parser(
        "completion",
        help="print a shell completion script",
        description="e.g. kami-agent completion bash > /etc/bash_completion.d/kami-agent",
    )
    completion.add_argument("shell", choices=["bash", "zsh", "tcsh"])
    completion.set_defaults(func=cmd_completion)
