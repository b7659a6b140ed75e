"""A SQLite ledger's bound-keys journal (agent/store/bound_journal.py; issue 13, item 3: "its
identity's history"): a ledger restored from an older backup never hands out a key it let
out after that backup, and re-importing such keys is refused. Real ledgers, a real agent
delivering to the sandbox platform."""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
from pathlib import Path

import pytest

from agent.domain import KeyState
from agent.sandbox.platform import SandboxPlatform
from agent.store import bound_journal
from agent.store.base import LedgerError
from agent.store.bound_journal import RESTORED_REASON, Journal, journal_path
from agent.store.identity import Opening
from agent.store.ledger.responder import Want
from agent.store.sqlite import SQLiteStore
from tests.conftest import keys, make_config, master_key_for_tests, stock
from tests.helpers import assert_platform_invariants, delivered_all, running_agent, wait_for

SKU = "GAME-100"


async def opened(path: Path, opening: Opening = Opening.OPEN) -> SQLiteStore:
    store = SQLiteStore(path, master_key_for_tests(), opening=opening)
    await store.open()
    return store


def restore(backup: Path, ledger: Path) -> None:
    """What a merchant does with a backup: the ledger file put back (its identity file is
    the same; the journal beside it is left as it is)."""
    for suffix in ("-wal", "-shm"):
        Path(f"{ledger}{suffix}").unlink(missing_ok=True)
    shutil.copy(backup, ledger)


async def deliver(store: SQLiteStore, sandbox: SandboxPlatform, tmp: Path, n: int) -> list[str]:
    orders = [sandbox.add_order(SKU) for _ in range(n)]
    async with running_agent(make_config(tmp, sandbox.base_url), store, sandbox):
        await wait_for(delivered_all(sandbox, orders), f"{n} deliveries")
    return orders


def journaled(ledger: Path, ledger_id: str) -> list[tuple[bytes, bool]]:
    journal = Journal.open(ledger, ledger_id)
    assert journal is not None
    return [record for chunk in journal.read(0) for record in chunk]


async def test_a_ledger_restored_from_an_older_backup_never_delivers_a_key_twice(
    tmp_path: Path, sandbox: SandboxPlatform
) -> None:
    ledger, backup = tmp_path / "ledger.db", tmp_path / "backup.db"
    store = await opened(ledger, Opening.CREATE)
    await stock(store, SKU, 10)
    await store.close()
    shutil.copy(ledger, backup)  # the nightly backup: ten free keys

    store = await opened(ledger)
    await deliver(store, sandbox, tmp_path, 4)  # four of them go to buyers after it
    await store.close()

    restore(backup, ledger)  # the disk failed; the merchant restores last night's ledger
    store = await opened(ledger)
    assert store.reconciled.set_aside == {SKU: 4}
    assert store.reconciled.unknown == 0
    voided = next(c for c in await store.stock_counts() if c.sku == SKU)
    assert (voided.free, voided.void) == (6, 4)
    await deliver(store, sandbox, tmp_path, 6)  # the six left, and never one of the four
    assert_platform_invariants(sandbox)
    # The key file imported again adds nothing: every key is held (bound, or set aside).
    report = await store.import_keys(SKU, keys(SKU, 10), "test", time.time())
    assert report.added == 0
    await store.close()
    # The keys set aside say why, and are not stock.
    with sqlite3.connect(ledger) as conn:
        reasons = conn.execute(
            "SELECT void_reason, COUNT(*) FROM card_keys WHERE state = 'void' GROUP BY 1"
        ).fetchall()
    assert reasons == [(RESTORED_REASON, 4)]
    with sqlite3.connect(ledger) as conn:  # every note appended was deleted from the ledger
        assert conn.execute("SELECT COUNT(*) FROM bound_pending").fetchone() == (0,)


async def test_keys_imported_and_let_out_after_the_backup_are_refused_on_reimport(
    tmp_path: Path, sandbox: SandboxPlatform
) -> None:
    ledger, backup = tmp_path / "ledger.db", tmp_path / "backup.db"
    store = await opened(ledger, Opening.CREATE)
    await store.close()
    shutil.copy(ledger, backup)  # taken before the stock arrived

    store = await opened(ledger)
    await stock(store, SKU, 5)
    await deliver(store, sandbox, tmp_path, 3)
    await store.close()

    restore(backup, ledger)
    store = await opened(ledger)
    assert store.reconciled.unknown == 3 and store.reconciled.set_aside == {}
    report = await store.import_keys(SKU, keys(SKU, 5), "test", time.time())
    assert (report.added, report.already_bound) == (2, 3)
    await deliver(store, sandbox, tmp_path, 2)
    assert_platform_invariants(sandbox)
    await store.close()


async def test_keys_reserved_then_given_back_stay_stock_after_a_restore(tmp_path: Path) -> None:
    ledger, backup = tmp_path / "ledger.db", tmp_path / "backup.db"
    store = await opened(ledger, Opening.CREATE)
    await stock(store, SKU, 3)
    await store.close()
    shutil.copy(ledger, backup)

    def ok(success: bool) -> tuple[int, bytes]:
        return 200, json.dumps({"success": success}).encode()

    def said(outcome: object) -> tuple[int, bytes]:
        return 200, b"{}"

    store = await opened(ledger)
    now = time.time()
    await store.reserve("eneba", "o-1", [Want(SKU, 2)], now, ok)  # let out: bound
    await store.cancel_order("eneba", "o-1", "buyer did not pay", now, said)  # taken back
    await store.close()
    assert [freed for _, freed in journaled(ledger, store.ledger_id or "")] == [
        False,
        False,
        True,
        True,
    ]

    restore(backup, ledger)
    store = await opened(ledger)
    assert store.reconciled.set_aside == {}  # the journal's last word on both: free again
    counts = next(c for c in await store.stock_counts() if c.sku == SKU)
    assert counts.free == 3
    await store.close()


async def test_a_missing_foreign_or_shortened_journal_is_refused_in_one_line(
    tmp_path: Path, sandbox: SandboxPlatform
) -> None:
    ledger = tmp_path / "ledger.db"
    store = await opened(ledger, Opening.CREATE)
    await stock(store, SKU, 3)
    await deliver(store, sandbox, tmp_path, 2)
    ledger_id = store.ledger_id or ""
    await store.close()
    path = journal_path(ledger)
    whole = path.read_bytes()

    path.write_bytes(whole[: -2 * bound_journal.RECORD])
    with pytest.raises(LedgerError, match=r"holds 0 records, fewer than the 2 .* cut short"):
        await opened(ledger)
    path.write_bytes(Journal.header_of("0" * 32) + whole[len(Journal.header_of(ledger_id)) :])
    with pytest.raises(LedgerError, match="belongs to another ledger"):
        await opened(ledger)
    path.unlink()
    with pytest.raises(LedgerError, match=r"journal .*\.bound of the ledger .* is missing"):
        await opened(ledger)
    # `init --adopt`: the merchant vouches for this ledger; the journal starts again from it.
    store = await opened(ledger, Opening.RECORD_IDENTITY)
    await store.close()
    assert len(journaled(ledger, ledger_id)) == 2
    store = await opened(ledger)
    assert store.reconciled.set_aside == {}
    await store.close()


async def test_a_journal_write_that_fails_is_made_good_from_the_ledger(
    tmp_path: Path, sandbox: SandboxPlatform, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Disk full right after a COMMIT: the delivery goes on (its keys are bound in the
    ledger), the notes stay in the ledger, and the next open appends them."""
    ledger = tmp_path / "ledger.db"
    store = await opened(ledger, Opening.CREATE)
    await stock(store, SKU, 2)
    original = Journal.append

    def disk_full(self: Journal, notes: object) -> None:
        if notes:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(Journal, "append", disk_full)
    await deliver(store, sandbox, tmp_path, 1)
    ledger_id = store.ledger_id or ""
    await store.close()
    monkeypatch.setattr(Journal, "append", original)
    assert journaled(ledger, ledger_id) == []
    store = await opened(ledger)
    bound = [k for k in await store.export_keys(SKU, KeyState.BOUND)]
    await store.close()
    assert len(bound) == 1 and len(journaled(ledger, ledger_id)) == 1


async def test_a_ledger_made_before_journals_starts_one_with_every_key_it_let_out(
    tmp_path: Path, sandbox: SandboxPlatform
) -> None:
    ledger = tmp_path / "ledger.db"
    store = await opened(ledger, Opening.CREATE)
    await stock(store, SKU, 3)
    await deliver(store, sandbox, tmp_path, 2)
    ledger_id = store.ledger_id or ""
    await store.close()
    journal_path(ledger).unlink()  # as a ledger of the previous release has none
    with sqlite3.connect(ledger) as conn:
        conn.execute("DELETE FROM ledger_meta WHERE key = ?", (bound_journal.WATERMARK,))
    store = await opened(ledger)
    await store.close()
    assert [freed for _, freed in journaled(ledger, ledger_id)] == [False, False]
