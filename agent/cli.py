"""Command line: init, run, demo, check, stock, orders, secrets."""

from __future__ import annotations

import argparse
import asyncio
import csv
import getpass
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

from agent import logs
from agent.config import Config, ConfigError, load_config
from agent.domain import AgentError, KeyState, LineState, OrderLine
from agent.keybox import StoreKeyError, new_master_key, parse_master_key
from agent.secrets import (
    delete_secret,
    env_var_for,
    lookup_secret,
    resolve_secret,
    store_secret,
)
from agent.stockfile import StockFileReader
from agent.store.base import LedgerError, Store, StoreError
from agent.suppliers.base import Balance
from agent.textsafe import printable

DEFAULT_CONFIG_PATHS = (Path("config.toml"), Path("/etc/kami-agent/config.toml"))


def _config_path(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    env = os.environ.get("KAMI_AGENT_CONFIG")
    if env:
        return Path(env)
    for candidate in DEFAULT_CONFIG_PATHS:
        if candidate.exists():
            return candidate
    raise ConfigError(
        "no config file: pass --config, set KAMI_AGENT_CONFIG, or create ./config.toml "
        "(see config.example.toml)"
    )


def _load(args: argparse.Namespace) -> Config:
    return load_config(_config_path(args.config))


async def _with_store(config: Config, action: Callable[[Store], Awaitable[int]]) -> int:
    from agent.runtime import open_store

    store = open_store(config.store)
    await store.open()
    try:
        return await action(store)
    finally:
        await store.close()


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


# --- commands ----------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    config = _load(args)
    logs.configure(config.log.level)
    from agent.runtime import run_daemon

    return asyncio.run(run_daemon(config))


def cmd_init(args: argparse.Namespace) -> int:
    """Creates the ledger (once): its schema, its data keys and its id, recorded beside it.
    --adopt records again the identity file of an existing ledger whose file was lost."""
    from agent.runtime import open_store
    from agent.store.identity import Opening, identity_path

    config = _load(args)
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


def cmd_check(args: argparse.Namespace) -> int:
    config = _load(args)
    print(
        f"config {config.source}: ok ({len(config.platforms)} platform(s), "
        f"{len(config.skus)} SKU(s))"
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
                print(f"platform {settings.name} ({settings.base_url}): FAILED: {exc}")
                problems += 1
            finally:
                await platform.close()
        return problems

    if lookup_secret(config.store.key_secret):
        try:
            failures += asyncio.run(_with_store(config, probe))
        except (LedgerError, StoreKeyError) as exc:
            print(f"store {config.store.describe()}: FAILED: {exc}")
            failures += 1
    else:
        print(
            f"store {config.store.describe()}: not checked"
            f" (its key {config.store.key_secret} is missing)"
        )
    print("check: ok" if not failures else f"check: {failures} problem(s)")
    return 0 if not failures else 1


def _progress_printer(total: int) -> Callable[[int], None]:
    interactive = sys.stderr.isatty()

    def show(done: int) -> None:
        if not interactive:
            return
        width = 30
        filled = int(width * done / total) if total else width
        sys.stderr.write(f"\r  [{'#' * filled}{'.' * (width - filled)}] {done:,}/{total:,}")
        sys.stderr.flush()

    return show


async def _supplier_balances(config: Config) -> dict[str, Balance]:
    """Each supplier's balance, asked once (it is what they can still sell us); a supplier
    that cannot be asked counts as no capacity, and the line says why."""
    from agent.runtime import build_supplier

    balances: dict[str, Balance] = {}
    for settings in config.suppliers:
        if not lookup_secret(settings.secret_name):
            print(
                f"supplier {settings.name}: balance unknown (secret {settings.secret_name} missing)"
            )
            continue
        supplier = build_supplier(settings)
        try:
            balance = await supplier.balance()
        except AgentError as exc:
            print(f"supplier {settings.name}: balance unknown ({exc})")
            continue
        finally:
            await supplier.close()
        balances[settings.name] = balance
        shown = printable(f"{balance.amount} {balance.currency}")  # the supplier's text
        print(f"supplier {settings.name}: balance {shown}")
    return balances


def cmd_status(args: argparse.Namespace) -> int:
    config = _load(args)

    async def action(store: Store) -> int:
        from agent.alerts import MAX_ACTIVE_LINES, Forecaster, deadlines_near
        from agent.forecast import format_duration

        balances = await _supplier_balances(config)
        forecasts = await Forecaster(config, store, time.time).forecast(balances)
        alerts = await store.open_alerts()
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
                print(f"  {_when(alert.opened_at)}  {severity:<8} {summary}")
        else:
            print("\nno open alerts")
        # Live, not from the last alert check: a platform deadline is minutes away.
        near = deadlines_near(await store.active_lines(MAX_ACTIVE_LINES), time.time())
        if near:
            print(f"\n{len(near)} orders near their platform's delivery deadline:")
            for left, line in near[:20]:
                due = "MISSED" if left < 0 else f"due in {format_duration(left)}"
                print(f"  {printable(line.platform)} {printable(line.order_id)}  {due}")
        return 0

    return asyncio.run(_with_store(config, action))


def cmd_stock_import(args: argparse.Namespace) -> int:
    config = _load(args)
    path = Path(args.file)
    if not path.is_file():
        raise AgentError(f"stock file {path} does not exist or is not a file")
    if args.sku not in config.skus:
        print(
            f"warning: SKU {args.sku!r} is not in [skus] of {config.source}; "
            "orders for it are parked until it is added",
            file=sys.stderr,
        )
    reader = StockFileReader(path)
    started = time.monotonic()

    async def action(store: Store) -> int:
        report = await store.import_keys(
            args.sku,
            reader,
            f"import:{path.name}",
            time.time(),
            _progress_printer(reader.count_lines()),
        )
        if sys.stderr.isatty():
            sys.stderr.write("\n")
        elapsed = time.monotonic() - started
        print(
            f"{args.sku}: added {report.added}, duplicates {report.duplicates}, "
            f"rejected {reader.rejected} ({elapsed:.1f} s)"
        )
        if report.already_bound:
            print(
                f"  refused {report.already_bound} key(s) this ledger already bound to orders"
                " (delivered before): a key is never sold twice"
            )
        if report.other_sku:
            print(
                f"  refused {report.other_sku} key(s) this ledger holds under another SKU"
                " (a key belongs to one SKU)"
            )
        for sample in reader.samples:
            print(f"  rejected {printable(sample)}")
        return 0

    return asyncio.run(_with_store(config, action))


def cmd_stock_list(args: argparse.Namespace) -> int:
    config = _load(args)

    async def action(store: Store) -> int:
        counts = await store.stock_counts()
        print(f"{'SKU':<24} {'free':>9} {'bound':>9} {'void':>7}")
        for c in counts:
            print(f"{printable(c.sku):<24} {c.free:>9} {c.bound:>9} {c.void:>7}")
        for sku in sorted(set(config.skus) - {c.sku for c in counts}):
            print(f"{printable(sku):<24} {0:>9} {0:>9} {0:>7}")
        return 0

    return asyncio.run(_with_store(config, action))


def cmd_stock_void(args: argparse.Namespace) -> int:
    config = _load(args)
    if args.count is None and not args.all:
        raise AgentError("say how many free keys to void: --count N or --all")

    async def action(store: Store) -> int:
        voided = await store.void_free_keys(args.sku, args.count, args.reason, time.time())
        print(f"{args.sku}: voided {voided} free key(s) ({args.reason})")
        return 0

    return asyncio.run(_with_store(config, action))


def _print_lines(lines: Sequence[OrderLine]) -> None:
    print(
        f"{'order':<20} {'sku':<14} {'qty':>3} {'state':<16} {'tries':>5} {'seen (UTC)':<19} reason"
    )
    for ln in lines:  # ids, SKUs and reasons come from platforms: escaped (agent/textsafe.py)
        print(
            f"{printable(ln.order_id):<20} {printable(ln.sku)[:14]:<14} {ln.quantity:>3} "
            f"{ln.state:<16} {ln.attempts:>5} {_when(ln.seen_at):<19} "
            f"{printable(ln.reason or '')}"
        )


def cmd_orders_list(args: argparse.Namespace) -> int:
    config = _load(args)
    state = LineState(args.state) if args.state else None

    async def action(store: Store) -> int:
        _print_lines(await store.list_lines(state, args.limit))
        return 0

    return asyncio.run(_with_store(config, action))


async def _one_line(store: Store, ref: str) -> OrderLine:
    lines = await store.find_lines(ref)
    if not lines:
        raise StoreError(f"no order {ref!r} in the ledger")
    if len(lines) > 1:
        raise StoreError(f"order {ref!r} exists on several platforms or lines; use the row id")
    return lines[0]


def cmd_orders_show(args: argparse.Namespace) -> int:
    config = _load(args)

    async def action(store: Store) -> int:
        line = await _one_line(store, args.id)
        _print_lines([line])
        print(
            f"\nplatform {printable(line.platform)}, row {line.id}, "
            f"buyer {printable(line.buyer_contact or '-')}, "
            f"paid {printable(line.paid_at or '-')}, delivered {_when(line.delivered_at)}"
        )
        print("audit trail:")
        for event in await store.events(line.id):
            kind, detail = printable(event.kind), printable(event.detail)
            print(f"  {_when(event.at)}  {kind:<18} {detail}")
        return 0

    return asyncio.run(_with_store(config, action))


def _operator_action(name: str) -> Callable[[argparse.Namespace], int]:
    def command(args: argparse.Namespace) -> int:
        config = _load(args)

        async def action(store: Store) -> int:
            line = await _one_line(store, args.id)
            method = store.retry_line if name == "retry" else store.resend_line
            updated = await method(line.id, time.time())
            print(
                f"order {printable(updated.order_id)}: now {updated.state}; the running agent"
                " picks it up on its next sweep"
            )
            return 0

        return asyncio.run(_with_store(config, action))

    return command


def cmd_stock_export(args: argparse.Namespace) -> int:
    config = _load(args)
    target = Path(args.file)
    if target.exists():
        raise AgentError(f"{target} exists; refusing to overwrite a file with card keys")

    async def action(store: Store) -> int:
        items = await store.export_keys(args.sku, KeyState(args.state))
        # Created private before a single key is written.
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["code", "secret"])
            writer.writerows([item.code, item.secret] for item in items)
        print(
            f"{args.sku}: exported {len(items)} {args.state} key(s) in clear to {target} "
            "(mode 0600) — delete it when done"
        )
        return 0

    return asyncio.run(_with_store(config, action))


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    config = _load(args)

    async def action(store: Store) -> int:
        key_id, moved = await store.rotate_data_key(time.time())
        print(f"card keys re-sealed with data key {key_id}: {moved} row(s); old data keys retired")
        return 0

    return asyncio.run(_with_store(config, action))


def cmd_keys_init(args: argparse.Namespace) -> int:
    config = _load(args)
    name = config.store.key_secret
    if lookup_secret(name):
        raise AgentError(f"secret {name} already exists; a new one would lock the ledger")
    store_secret(name, new_master_key())
    print(
        f"secret {name}: a new random store key is in the keyring — back it up: without it "
        "the card keys in the ledger cannot be read"
    )
    return 0


def cmd_secrets_delete(args: argparse.Namespace) -> int:
    delete_secret(args.name)
    print(f"secret {args.name}: deleted from the keyring")
    return 0


def cmd_secrets_set(args: argparse.Namespace) -> int:
    value = sys.stdin.readline().rstrip("\n") if args.stdin else getpass.getpass(f"{args.name}: ")
    if not value:
        raise AgentError("empty secret, nothing stored")
    store_secret(args.name, value)
    print(f"secret {args.name}: stored in the keyring")
    return 0


def cmd_secrets_list_missing(args: argparse.Namespace) -> int:
    config = _load(args)
    missing = [name for name in config.secret_names() if not lookup_secret(name)]
    for name in missing:
        print(name)
    return 1 if missing else 0


def _key_secret_name(args: argparse.Namespace) -> str:
    """The store key's secret name from the config, or the default when there is no config
    (migrate-store needs nothing else from it)."""
    try:
        path = _config_path(args.config)
    except ConfigError:
        return "store.key"
    return load_config(path).store.key_secret if path.exists() else "store.key"


def cmd_migrate_store(args: argparse.Namespace) -> int:
    from agent.store.migrate import (
        check_postgres_target,
        migrate_sqlite_to_postgres,
        parse_sqlite_source,
    )
    from agent.store.postgres_base import safe_url

    source = parse_sqlite_source(args.source)
    target = check_postgres_target(args.target)
    key_name = args.key or _key_secret_name(args)
    master = parse_master_key(resolve_secret(key_name))
    password = resolve_secret(args.password) if args.password else None
    report = asyncio.run(migrate_sqlite_to_postgres(source, target, master, password=password))
    print(
        f"migrate-store: done — {report.rows['orders']} order lines, {report.rows['card_keys']}"
        f" card keys, {report.rows['events']} events copied. {source} is untouched (keep it as"
        f' a backup). Now set [store] url = "{safe_url(target)}" in the config of every agent and'
        " start them."
    )
    return 0


# --- parser ---------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kami-agent", description=__doc__)
    parser.add_argument(
        "-c",
        "--config",
        help="config file (default: $KAMI_AGENT_CONFIG, "
        "./config.toml, /etc/kami-agent/config.toml)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    init = sub.add_parser("init", help="create the ledger (once, after `keys init`)")
    init.add_argument(
        "--adopt",
        action="store_true",
        help="record again the lost identity file of this shop's existing ledger",
    )
    init.set_defaults(func=cmd_init)
    sub.add_parser("run", help="run the daemon in the foreground").set_defaults(func=cmd_run)
    demo = sub.add_parser("demo", help="run against the embedded sandbox platform")
    demo.add_argument("--orders", type=int, default=150, help="orders in the steady stream")
    demo.add_argument("--burst", type=int, default=500, help="orders in the flash-sale burst")
    demo.set_defaults(func=cmd_demo)
    sub.add_parser("status", help="stock, sales rate, time to empty, open alerts").set_defaults(
        func=cmd_status
    )
    sub.add_parser("check", help="validate config, secrets and connectivity").set_defaults(
        func=cmd_check
    )

    stock = sub.add_parser("stock", help="card key stock").add_subparsers(
        dest="stock_cmd", required=True
    )
    imp = stock.add_parser("import", help="import keys: one per line, or CSV code,secret")
    imp.add_argument("sku")
    imp.add_argument("file")
    imp.set_defaults(func=cmd_stock_import)
    stock.add_parser("list", help="key counts per SKU").set_defaults(func=cmd_stock_list)
    export = stock.add_parser("export", help="write keys IN CLEAR to a new CSV file (0600)")
    export.add_argument("sku")
    export.add_argument("file")
    export.add_argument("--state", choices=[s.value for s in KeyState], default="free")
    export.set_defaults(func=cmd_stock_export)
    void = stock.add_parser("void", help="take free keys out of stock, with a reason")
    void.add_argument("sku")
    void.add_argument("--count", type=int, help="how many free keys (oldest first)")
    void.add_argument("--all", action="store_true", help="every free key of the SKU")
    void.add_argument("--reason", required=True)
    void.set_defaults(func=cmd_stock_void)

    orders = sub.add_parser("orders", help="orders in the ledger").add_subparsers(
        dest="orders_cmd", required=True
    )
    lst = orders.add_parser("list", help="recent order lines")
    lst.add_argument("--state", choices=[s.value for s in LineState])
    lst.add_argument("--limit", type=int, default=50)
    lst.set_defaults(func=cmd_orders_list)
    for name, func, text in (
        ("show", cmd_orders_show, "an order and its audit trail"),
        ("retry", _operator_action("retry"), "send a needs_attention order back to work"),
        ("resend", _operator_action("resend"), "deliver the same keys again"),
    ):
        p = orders.add_parser(name, help=text)
        p.add_argument("id", help="platform order id (or ledger row id)")
        p.set_defaults(func=func)

    sec = sub.add_parser("secrets", help="secrets in the keyring").add_subparsers(
        dest="secrets_cmd", required=True
    )
    sset = sec.add_parser("set", help="store a secret (prompted, or --stdin)")
    sset.add_argument("name")
    sset.add_argument("--stdin", action="store_true")
    sset.set_defaults(func=cmd_secrets_set)
    sdel = sec.add_parser("delete", help="remove a secret from the keyring")
    sdel.add_argument("name")
    sdel.set_defaults(func=cmd_secrets_delete)
    sec.add_parser("list-missing", help="secrets the config names but nobody stored").set_defaults(
        func=cmd_secrets_list_missing
    )
    mig = sub.add_parser(
        "migrate-store",
        help="copy a stopped agent's SQLite ledger into an empty PostgreSQL database",
    )
    mig.add_argument("--from", dest="source", required=True, help="sqlite:/path/to/kami.db")
    mig.add_argument(
        "--to", dest="target", required=True, help="postgresql://user@host:port/database"
    )
    mig.add_argument("--key", help="secret holding the store key (default: the config's)")
    mig.add_argument("--password", help="secret holding the PostgreSQL password, if any")
    mig.set_defaults(func=cmd_migrate_store)
    keys = sub.add_parser("keys", help="the encryption of card keys at rest").add_subparsers(
        dest="keys_cmd", required=True
    )
    keys.add_parser(
        "init", help="create the store key secret (once, before first use)"
    ).set_defaults(func=cmd_keys_init)
    keys.add_parser("rotate", help="re-seal every card key with a fresh data key").set_defaults(
        func=cmd_keys_rotate
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except ConfigError as exc:
        print(f"kami-agent: config error: {exc}", file=sys.stderr)
        return 2
    except (AgentError, StoreError) as exc:
        print(f"kami-agent: error: {printable(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
