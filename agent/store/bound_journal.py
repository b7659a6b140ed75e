"""The history of the keys a SQLite ledger let out: a journal beside it that no restore rolls back.

A ledger restored from an older backup holds as free the keys it bound after that backup,
and would hand them to a second buyer; re-importing the key file after the restore would do
the same. So every key that may leave the box (bound to an order line, or consigned to a
platform's pool) is also written, as its keyed hash, to an append-only journal beside the
ledger (`<ledger>.bound`, mode 0600), and so is a key taken back to free stock (a
reservation cancelled before its keys were provided). The ledger notes each such change in
`bound_pending` by trigger, in the transaction that makes it (migration 0011); the engine
appends the notes to the journal and fsyncs it right after that transaction's COMMIT, before
any caller sees the keys, and deletes them in its next transaction. A note left by a crash
between the two is appended at the next open: a record is never missing, and one written
twice is harmless (the journal is read as a set).

The ledger keeps a watermark: the journal's length when it last looked. At every open, the
records past it are checked against the ledger. Normally they are this ledger's own notes
(keys it holds as bound: nothing to do). After a restore they are the keys let out since
the backup: those the ledger holds as free are voided (reason RESTORED_REASON) and reported,
those it does not hold at all go to `bound_history`, which an import reads, so re-importing
them is refused. A journal missing, shortened, or of another ledger is refused in one line;
`kami-agent init --adopt` starts it again from the ledger.

Cost: one more fdatasync per committed transaction that let keys out (about 0.14 ms here),
and one trigger row per key. PostgreSQL keeps no journal (see its migration 0009).
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from agent.i18n import N_
from agent.logs import get_logger
from agent.phrased import PhrasedLedgerError
from agent.store.base import LedgerError
from agent.store.identity import META_TABLE, fsync_dir, os_error_text

log = get_logger("kami.store.journal")
SUFFIX = ".bound"
MAGIC = b"kami-agent bound keys v1 "
HASH_BYTES = 32  # HMAC-SHA-256 (agent/keybox.py)
RECORD = HASH_BYTES + 1  # the hash, then b"B" (let out) or b"F" (taken back to free)
LET_OUT, TAKEN_BACK = b"B", b"F"
WATERMARK = "journal_watermark"
RESTORED_REASON = "restored ledger: the bound-keys journal says this key was let out"
CHUNK = 5_000  # hashes per statement (SQLite allows 32,766 parameters)
# Every key that may ever have left the box: what a new journal is started with.
LET_OUT_KEYS = (
    "SELECT secret_hash FROM card_keys WHERE state IN ('bound', 'consigned')"
    " OR bound_at IS NOT NULL OR was_bound_to IS NOT NULL"
)
PENDING = "SELECT rowid, secret_hash, freed FROM bound_pending"
_Note = tuple[int, bytes, int]  # a row of PENDING


def journal_path(ledger: Path) -> Path:
    """Where a SQLite ledger's bound-keys journal lives: beside it."""
    return ledger.with_name(ledger.name + SUFFIX)


class Journal:
    """The journal file: a header naming its ledger, then fixed-size records."""

    def __init__(self, path: Path, ledger_id: str, header: int, records: int) -> None:
        self.path = path
        self.ledger_id = ledger_id
        self._header = header
        self.records = records
        self._fd: int | None = None

    @staticmethod
    def header_of(ledger_id: str) -> bytes:
        return MAGIC + ledger_id.encode() + b"\n"

    @classmethod
    def create(cls, ledger: Path, ledger_id: str) -> Journal:
        """A new, empty journal; refused where a file is."""
        path = journal_path(ledger)
        header = cls.header_of(ledger_id)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, header)
                os.fsync(fd)
            finally:
                os.close(fd)
            fsync_dir(path.parent)
        except FileExistsError:
            raise PhrasedLedgerError(
                N_(
                    "a bound-keys journal %(path)s already exists: it belongs to another"
                    " ledger; nothing changed"
                ),
                path=path,
            ) from None
        except OSError as exc:
            raise LedgerError(os_error_text(path, exc)) from None
        return cls(path, ledger_id, len(header), 0)

    @classmethod
    def open(cls, ledger: Path, ledger_id: str) -> Journal | None:
        """The journal beside the ledger, or None if there is none; refuses one of another
        ledger, and cuts off a record half written by a crash."""
        path = journal_path(ledger)
        header = cls.header_of(ledger_id)
        try:
            with path.open("rb") as handle:
                found = handle.read(len(header))
                size = os.fstat(handle.fileno()).st_size
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise LedgerError(os_error_text(path, exc)) from None
        if found != header:
            if found.startswith(MAGIC):
                raise PhrasedLedgerError(
                    N_(
                        "the bound-keys journal %(path)s belongs to another ledger, not to"
                        " %(ledger)s (id %(id)s): put this ledger's journal back"
                    ),
                    path=path,
                    ledger=ledger,
                    id=ledger_id,
                )
            raise PhrasedLedgerError(
                N_("%(path)s is not a bound-keys journal: restore it from backup"), path=path
            )
        records, torn = divmod(size - len(header), RECORD)
        journal = cls(path, ledger_id, len(header), records)
        if torn:
            log.warning("journal_torn_record_dropped", journal=str(path), bytes=torn)
            try:
                os.truncate(path, len(header) + records * RECORD)
            except OSError as exc:
                raise LedgerError(os_error_text(path, exc)) from None
        return journal

    def append(self, notes: Sequence[tuple[bytes, bool]]) -> None:
        """Appends (hash, freed) records, durably (fdatasync) before returning."""
        if not notes:
            return
        data = b"".join(bytes(h) + (TAKEN_BACK if freed else LET_OUT) for h, freed in notes)
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        size = self._header + self.records * RECORD
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
            os.fdatasync(self._fd)
        except OSError:
            # A partial record would shift every later one: cut back to whole records (the
            # notes stay in the ledger and are appended again).
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, size)
            raise
        self.records = (os.fstat(self._fd).st_size - self._header) // RECORD

    def read(self, start: int) -> Iterator[list[tuple[bytes, bool]]]:
        """The records from `start` on, in chunks."""
        with self.path.open("rb") as handle:
            handle.seek(self._header + start * RECORD)
            while chunk := handle.read(CHUNK * RECORD):
                whole = len(chunk) // RECORD * RECORD
                yield [
                    (chunk[i : i + HASH_BYTES], chunk[i + HASH_BYTES : i + RECORD] == TAKEN_BACK)
                    for i in range(0, whole, RECORD)
                ]

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclass
class Reconciled:
    """What an open found past the ledger's watermark."""

    set_aside: dict[str, int] = field(default_factory=dict)  # SKU -> keys voided
    unknown: int = 0  # keys let out that the ledger does not hold (refused on import)

    @property
    def total(self) -> int:
        return sum(self.set_aside.values())


class JournalKeeper:
    """The ledger's side of the journal, used on the ledger thread only."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self._journaled: list[int] = []  # bound_pending rowids appended, deleted next commit
        self._watermark = journal.records

    def before_commit(self, conn: sqlite3.Connection) -> list[_Note]:
        """In the transaction, just before COMMIT: the notes to append after it (and the
        previous commit's, appended since, deleted in this one)."""
        if self._journaled:
            # One statement (one text, prepared once) for any number of rows.
            conn.execute(
                "DELETE FROM bound_pending WHERE rowid IN (SELECT value FROM json_each(?))",
                (json.dumps(self._journaled),),
            )
            _set_watermark(conn, self._watermark)
            self._journaled = []
        return conn.execute(PENDING).fetchall()

    def after_commit(self, notes: list[_Note]) -> None:
        """Right after COMMIT, before the callers are answered: the notes made durable."""
        if not notes:
            return
        try:
            self.journal.append([(n[1], bool(n[2])) for n in notes])
        except OSError as exc:
            # The notes stay in the ledger and go with the next commit, or at the next open.
            log.error(
                "journal_append_failed",
                journal=str(self.journal.path),
                error=os_error_text(self.journal.path, exc),
                keys=len(notes),
            )
            return
        self._journaled = [n[0] for n in notes]
        self._watermark = self.journal.records

    @property
    def unsettled(self) -> bool:
        """Whether notes were appended since the ledger last deleted them."""
        return bool(self._journaled)

    def close(self) -> None:
        self.journal.close()


def keep(
    conn: sqlite3.Connection, ledger: Path, ledger_id: str, adopt: bool
) -> tuple[JournalKeeper, Reconciled]:
    """At open, on the ledger thread: the journal checked (or started), the notes a crash
    left appended, and the records past the ledger's watermark reconciled with it.
    `adopt` (`init --adopt`): a lost or shortened journal is started again from the ledger."""
    watermark = _watermark(conn)
    journal = Journal.open(ledger, ledger_id)
    if journal is None:
        if watermark is not None and not adopt:
            raise PhrasedLedgerError(
                N_(
                    "the bound-keys journal %(path)s of the ledger %(ledger)s is missing:"
                    " restore it from backup with the ledger; if it is lost for good,"
                    " `kami-agent init --adopt` starts it again from this ledger"
                ),
                path=journal_path(ledger),
                ledger=ledger,
            )
        journal = Journal.create(ledger, ledger_id)
    elif watermark is not None and journal.records < watermark and not adopt:
        raise PhrasedLedgerError(
            N_(
                "the bound-keys journal %(path)s holds %(records)d records, fewer than the"
                " %(watermark)d the ledger %(ledger)s has seen: it was cut short or replaced by"
                " an older copy; put the journal that belongs to this ledger back, or run"
                " `kami-agent init --adopt` to continue it from this ledger"
            ),
            path=journal.path,
            records=journal.records,
            watermark=watermark,
            ledger=ledger,
        )
    pending = conn.execute("SELECT 1 FROM bound_pending LIMIT 1").fetchone() is not None
    if watermark is not None and watermark == journal.records and not pending and not adopt:
        # the usual open: nothing to write (read-only ledgers open)
        return JournalKeeper(journal), Reconciled()
    conn.execute("BEGIN IMMEDIATE")
    try:
        found = _reconcile(conn, journal, _watermark(conn), adopt)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    if found.total or found.unknown:
        log.error(
            "restored_keys_set_aside",
            ledger=str(ledger),
            set_aside=found.set_aside,
            unknown=found.unknown,
        )
    return JournalKeeper(journal), found


def _reconcile(
    conn: sqlite3.Connection, journal: Journal, watermark: int | None, adopt: bool
) -> Reconciled:
    if watermark is None or adopt:
        # A new journal (a new ledger, one made before journals, or `init --adopt`): every
        # key the ledger ever let out, appended; records already there are checked below.
        # A journal found where the ledger had none (a ledger restored from before journals)
        # is checked from its start.
        start = 0 if watermark is None else min(watermark, journal.records)
        journal.append([(bytes(r[0]), False) for r in conn.execute(LET_OUT_KEYS)])
        watermark = start
    notes = conn.execute(PENDING).fetchall()
    journal.append([(bytes(n[1]), bool(n[2])) for n in notes])  # duplicates are harmless
    conn.execute("DELETE FROM bound_pending")
    last: dict[bytes, bool] = {}  # hash -> freed, the last record of each key
    for chunk in journal.read(watermark):
        for digest, freed in chunk:
            last[digest] = freed
    found = Reconciled()
    let_out = [h for h, freed in last.items() if not freed]
    taken_back = [h for h, freed in last.items() if freed]
    now = time.time()
    for part in _chunks(let_out):
        marks = ",".join("?" * len(part))
        free = conn.execute(
            f"SELECT sku FROM card_keys WHERE state = 'free' AND secret_hash IN ({marks})", part
        ).fetchall()
        for (sku,) in free:
            found.set_aside[sku] = found.set_aside.get(sku, 0) + 1
        conn.execute(
            f"UPDATE card_keys SET state = 'void', void_reason = ? WHERE state = 'free'"
            f" AND secret_hash IN ({marks})",
            (RESTORED_REASON, *part),
        )
        held = {
            bytes(r[0])
            for r in conn.execute(
                f"SELECT secret_hash FROM card_keys WHERE secret_hash IN ({marks})", part
            )
        }
        missing = [(h, now) for h in part if h not in held]
        conn.executemany("INSERT OR IGNORE INTO bound_history VALUES (?, ?)", missing)
        found.unknown += len(missing)
    for part in _chunks(taken_back):
        marks = ",".join("?" * len(part))
        conn.execute(f"DELETE FROM bound_history WHERE secret_hash IN ({marks})", part)
    _set_watermark(conn, journal.records)
    return found


def _chunks(items: list[bytes]) -> Iterator[list[bytes]]:
    for start in range(0, len(items), CHUNK):
        yield items[start : start + CHUNK]


def _watermark(conn: sqlite3.Connection) -> int | None:
    row = conn.execute(f"SELECT value FROM {META_TABLE} WHERE key = ?", (WATERMARK,)).fetchone()
    return None if row is None else int(row[0])


def _set_watermark(conn: sqlite3.Connection, records: int) -> None:
    conn.execute(
        f"INSERT INTO {META_TABLE} (key, value) VALUES (?, ?)"
        " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (WATERMARK, str(records)),
    )
