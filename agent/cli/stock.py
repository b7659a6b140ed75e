"""`kami-agent stock`: import, list, export, void and unvoid card keys."""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import FrameType
from typing import Any

from agent.cli.common import (
    CommandError,
    _,
    add_json_flag,
    bounded_int,
    confirm,
    load,
    print_json,
    print_table,
    with_store,
)
from agent.domain import ImportReport, KeyState
from agent.i18n import N_
from agent.progress import Progress
from agent.stockfile import StockFileReader
from agent.store.base import Store
from agent.store.imports import merge_skus
from agent.textsafe import printable

# Keys handed to the ledger per call, each call one transaction, with a gap after it: a daemon
# running beside the import waits for one such transaction at worst (bench/import_million.py:
# at most 0.43 s on a loaded 2-core machine, 0.18 s at the 99th percentile; README).
IMPORT_CHUNK = 2_000
MIN_GAP, MAX_GAP = 0.01, 0.1  # seconds left to other writers between import transactions
# Voiding more keys than this asks first: `--count -1` once voided a whole SKU's stock.
CONFIRM_ABOVE = 10
MAX_KEYS = 100_000_000
SKU_HELP = N_("the SKU, as in [skus] of the config")


class _StopOnSignal:
    """SIGINT/SIGTERM during an import: stop after the chunk being written (it commits, the
    rest of the file is left); a second Ctrl-C stops at once."""

    def __init__(self, reader: StockFileReader) -> None:
        self.reader = reader
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> _StopOnSignal:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.reader.stop_requested:
            raise KeyboardInterrupt
        self.reader.stop_requested = True
        stopping = _("stopping after the keys being written (Ctrl-C again to stop at once)")
        sys.stderr.write(f"\n{stopping}\n")
        sys.stderr.flush()


def _merge(total: ImportReport, part: ImportReport) -> ImportReport:
    return replace(
        total,
        added=total.added + part.added,
        duplicates=total.duplicates + part.duplicates,
        already_bound=total.already_bound + part.already_bound,
        other_sku=total.other_sku + part.other_sku,
        other_skus=merge_skus(total.other_skus, part.other_skus),
    )


def _open_rejects(path: str | None) -> Any:
    if path is None:
        return None
    try:
        # line numbers and reasons only, but private all the same
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise CommandError(
            _("%(file)s exists; refusing to overwrite it") % {"file": path}
        ) from None
    except OSError as exc:
        why = (exc.strerror or "").lower()
        raise CommandError(
            _("cannot create %(file)s: %(why)s") % {"file": path, "why": why}
        ) from None
    handle = os.fdopen(fd, "w", encoding="utf-8")
    handle.write("line,reason\n")
    return handle


def cmd_import(args: argparse.Namespace) -> int:
    config = load(args)
    path = Path(args.file)
    reader = StockFileReader(
        path, encoding=args.encoding, header=args.header, sheet=args.sheet, translator=_
    )
    reader.prepare()
    if args.sku not in config.skus:
        print(
            _(
                "warning: SKU %(sku)r is not in [skus] of %(file)s; orders for it are parked"
                " until it is added"
            )
            % {"sku": printable(args.sku), "file": config.source},
            file=sys.stderr,
        )
    rejects = _open_rejects(args.rejects)
    reader.rejections.sink = rejects
    total = reader.count_lines()
    progress = Progress(total, _("lines"), translator=_)
    started = time.monotonic()
    source = f"import:{path.name}"

    async def action(store: Store) -> int:
        report = ImportReport()
        for chunk in reader.chunks(args.batch):
            began = time.monotonic()
            part = await store.import_keys(args.sku, chunk, source, time.time())
            report = _merge(report, part)
            progress.update(reader.lines_read)
            # A gap between transactions: a daemon waiting for the ledger backs off up to
            # 100 ms between tries, and without a gap the import would take the lock again
            # before it looked (it waited for seconds under load).
            await asyncio.sleep(min(MAX_GAP, max(MIN_GAP, (time.monotonic() - began) / 2)))
        progress.finish(reader.lines_read)
        _print_import(args.sku, reader, report, time.monotonic() - started, total)
        return 130 if reader.stop_requested else 0

    try:
        with _StopOnSignal(reader):
            return with_store(config, action)
    finally:
        if rejects is not None:
            rejects.close()


def _print_import(
    sku: str, reader: StockFileReader, report: ImportReport, elapsed: float, total: int
) -> None:
    print(
        _("%(sku)s: added %(added)d, duplicates %(duplicates)d, rejected %(rejected)d (%(s).1f s)")
        % {
            "sku": printable(sku),
            "added": report.added,
            "duplicates": report.duplicates,
            "rejected": reader.rejected,
            "s": elapsed,
        }
    )
    print(
        "  "
        + _("read %(n)s line(s) as %(format)s")
        % {"n": f"{reader.lines_read:,}", "format": reader.described}
    )
    if report.already_bound:
        print(
            "  "
            + _(
                "refused %(n)d key(s) this ledger already bound to orders (delivered before):"
                " a key is never sold twice"
            )
            % {"n": report.already_bound}
        )
    if report.other_sku:
        named = ", ".join(printable(s) for s in report.other_skus[:5])
        if len(report.other_skus) > 5:
            named += ", …"
        print(
            "  "
            + _(
                "refused %(n)d key(s) this ledger holds under another SKU: %(skus)s (a key"
                " belongs to one SKU)"
            )
            % {"n": report.other_sku, "skus": named}
        )
    for skipped in reader.skipped:
        print("  " + _("skipped %(what)s") % {"what": printable(skipped)})
    for line in reader.rejections.report():
        print("  " + _("rejected %(what)s") % {"what": printable(line)})
    if reader.expiring:
        print(
            "  "
            + _(
                "%(n)d key(s) carry an expiry date, stored with them: a key is never delivered"
                " once its date has passed (expired ones in the file were rejected)"
            )
            % {"n": reader.expiring}
        )
    if reader.stop_requested:
        print(
            "  "
            + _(
                "interrupted at line %(n)s of %(total)s: the keys added above are in stock; run"
                " the same import again to add the rest (keys already in stock count as"
                " duplicates)"
            )
            % {"n": f"{reader.lines_read:,}", "total": f"{total:,}"}
        )


def cmd_list(args: argparse.Namespace) -> int:
    config = load(args)

    async def action(store: Store) -> int:
        counts = {c.sku: (c.free, c.bound, c.void, c.expired) for c in await store.stock_counts()}
        for sku in config.skus:
            counts.setdefault(sku, (0, 0, 0, 0))
        ordered = sorted(counts.items())
        if args.json:
            print_json(
                [
                    {"sku": s, "free": f, "bound": b, "void": v, "expired": x}
                    for s, (f, b, v, x) in ordered
                ]
            )
            return 0
        # Free keys past their expiry (never sold) get a column when there are any.
        expiring = any(counted[3] for _sku, counted in ordered)
        width = 4 if expiring else 3
        headers = [_("SKU"), _("free"), _("bound"), _("void"), _("expired")][: width + 1]
        rows = [[sku, *(str(n) for n in counted[:width])] for sku, counted in ordered]
        print_table(headers, rows, "<" + ">" * width)
        return 0

    return with_store(config, action)


def cmd_export(args: argparse.Namespace) -> int:
    config = load(args)
    target = Path(args.file)
    if target.exists():
        raise CommandError(
            _("%(file)s exists; refusing to overwrite a file with card keys") % {"file": target}
        )
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise CommandError(
            _("folder %(folder)s does not exist: create it first") % {"folder": folder}
        )

    async def action(store: Store) -> int:
        items = await store.export_keys(args.sku, KeyState(args.state))
        try:
            # Created private before a single key is written.
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            why = (exc.strerror or type(exc).__name__).lower()
            raise CommandError(
                _("cannot create %(file)s: %(why)s") % {"file": target, "why": why}
            ) from None
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["code", "secret"])
            writer.writerows([item.code, item.secret] for item in items)
        print(
            _(
                "%(sku)s: exported %(n)d %(state)s key(s) in clear to %(file)s (mode 0600) —"
                " delete it when done"
            )
            % {"sku": printable(args.sku), "n": len(items), "state": args.state, "file": target}
        )
        return 0

    return with_store(config, action)


def cmd_void(args: argparse.Namespace) -> int:
    config = load(args)
    if args.count is None and not args.all:
        raise CommandError(_("say how many free keys to void: --count N or --all"))
    if args.count is not None and args.all:
        raise CommandError(_("--count and --all exclude each other"))
    if not args.reason.strip():
        raise CommandError(_("--reason must say why (it stays with the keys)"))

    async def action(store: Store) -> int:
        free = {c.sku: c.free for c in await store.stock_counts()}.get(args.sku, 0)
        if free == 0:
            raise CommandError(_("%(sku)s has no free keys to void") % {"sku": printable(args.sku)})
        count = free if args.all else min(args.count, free)
        if count > CONFIRM_ABOVE:
            confirm(
                _("void %(n)d of the %(free)d free keys of %(sku)s (%(reason)s)?")
                % {
                    "n": count,
                    "free": free,
                    "sku": printable(args.sku),
                    "reason": printable(args.reason),
                },
                str(count),
                assume_yes=args.yes,
                refusal=_("not voiding %(n)d keys") % {"n": count},
            )
        # The count confirmed, also for --all: keys imported meanwhile stay free.
        voided = await store.void_free_keys(args.sku, count, args.reason, time.time())
        print(
            _("%(sku)s: voided %(n)d free key(s) (%(reason)s)")
            % {"sku": printable(args.sku), "n": voided, "reason": printable(args.reason)}
        )
        return 0

    return with_store(config, action)


def cmd_unvoid(args: argparse.Namespace) -> int:
    config = load(args)

    async def action(store: Store) -> int:
        # Only keys voided while free: a key once bound to an order never returns to stock.
        count = await store.unvoid_keys(args.sku, args.reason, args.count, time.time())
        if count == 0:
            raise CommandError(
                _(
                    "%(sku)s has no keys voided as %(reason)r that can return to stock (the"
                    " reason must match exactly; keys once bound to an order stay void)"
                )
                % {"sku": printable(args.sku), "reason": printable(args.reason)}
            )
        print(
            _("%(sku)s: %(n)d key(s) voided as %(reason)r are free again")
            % {"sku": printable(args.sku), "n": count, "reason": printable(args.reason)}
        )
        return 0

    return with_store(config, action)


def add_parsers(sub: Any) -> None:
    stock = sub.add_parser("stock", help=_("card key stock")).add_subparsers(
        dest="stock_cmd", required=True
    )
    imp = stock.add_parser(
        "import",
        help=_("import keys: one per line, CSV code,secret[,expiry], or .xlsx"),
        description=_(
            "Reads UTF-8, UTF-16/32 with BOM, GBK/GB18030 (detected) and .xlsx; skips header"
            " rows; reports every rejected line by number (never its content)."
        ),
    )
    imp.add_argument("sku", help=_(SKU_HELP))
    imp.add_argument("file", help=_("the stock file"))
    imp.add_argument("--encoding", help=_("the file's encoding when detection cannot tell"))
    head = imp.add_mutually_exclusive_group()
    head.add_argument(
        "--header", dest="header", action="store_const", const=True, help=_("skip the first row")
    )
    head.add_argument(
        "--no-header",
        dest="header",
        action="store_const",
        const=False,
        help=_("the first row is a key too"),
    )
    imp.add_argument("--sheet", help=_(".xlsx: the sheet to read (default: the first)"))
    imp.add_argument(
        "--rejects", metavar="FILE", help=_("write every rejected line number and why to FILE")
    )
    imp.add_argument(
        "--batch",
        type=bounded_int(100, 20_000, N_("keys")),
        default=IMPORT_CHUNK,
        help=_(
            "keys per ledger transaction (default %(n)s; smaller: a running daemon waits less"
            " for the ledger, the import takes longer)"
        )
        % {"n": f"{IMPORT_CHUNK:,}"},
    )
    imp.set_defaults(func=cmd_import, header=None)

    lst = stock.add_parser("list", help=_("key counts per SKU"))
    add_json_flag(lst)
    lst.set_defaults(func=cmd_list)

    export = stock.add_parser("export", help=_("write keys IN CLEAR to a new CSV file (0600)"))
    export.add_argument("sku", help=_(SKU_HELP))
    export.add_argument("file", help=_("the CSV file to create"))
    export.add_argument(
        "--state",
        choices=[s.value for s in KeyState],
        default="free",
        help=_(
            "which keys: free (in stock, the default), bound (sold), void (taken out) or"
            " consigned (handed to a platform's pool)"
        ),
    )
    export.set_defaults(func=cmd_export)

    void = stock.add_parser("void", help=_("take free keys out of stock, with a reason"))
    void.add_argument("sku", help=_(SKU_HELP))
    void.add_argument(
        "--count",
        type=bounded_int(1, MAX_KEYS, N_("keys")),
        help=_("how many free keys (oldest first)"),
    )
    void.add_argument("--all", action="store_true", help=_("every free key of the SKU"))
    void.add_argument(
        "--reason", required=True, help=_("why (kept with the keys; unvoid names it)")
    )
    void.add_argument(
        "--yes",
        action="store_true",
        help=_("confirm voiding more than %(n)d keys") % {"n": CONFIRM_ABOVE},
    )
    void.set_defaults(func=cmd_void)

    unvoid = stock.add_parser(
        "unvoid", help=_("return keys voided by mistake to stock (never keys that were bound)")
    )
    unvoid.add_argument("sku", help=_(SKU_HELP))
    unvoid.add_argument("--reason", required=True, help=_("the reason they were voided with"))
    unvoid.add_argument(
        "--count",
        type=bounded_int(1, MAX_KEYS, N_("keys")),
        help=_("how many of them, oldest first (default: all voided with that reason)"),
    )
    unvoid.set_defaults(func=cmd_unvoid)
