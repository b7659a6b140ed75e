"""The ledger's identity: which ledger this shop set up, and the checks that refuse any other.

`kami-agent init` creates a ledger and gives it a random id, stored twice: inside the ledger
(table ledger_meta) and outside it, in an identity file beside the ledger
(`<ledger>.identity`, mode 0600, written atomically). Every later open compares the two, so
a ledger that was deleted, emptied, replaced by another one, or is not a ledger at all is
refused with one clear line, instead of being taken for a new, empty ledger (whose stock,
re-imported, would hand keys already delivered to a second buyer).

PostgreSQL: the id lives in the database only. A database is named by a URL the merchant
configured and shared by several agents on several machines, so there is no one place
beside it for an identity file; `init` creates the schema and the id, and an open adopts a
database created before ids existed.

The SQLite checks made before the driver opens the file (it would create a missing file,
and take a zero-length one for a new database) are here too, and the wording of driver
errors, so every command says what is wrong with the ledger in words.
"""

from __future__ import annotations

import enum
import errno
import json
import os
import secrets
import sqlite3
import time
from pathlib import Path

from agent.i18n import N_
from agent.phrased import PhrasedLedgerError
from agent.store.base import LedgerError

IDENTITY_SUFFIX = ".identity"
SQLITE_HEADER = b"SQLite format 3\x00"
META_TABLE = "ledger_meta"


def identity_path(ledger: Path) -> Path:
    """Where a SQLite ledger's identity file lives: beside it."""
    return ledger.with_name(ledger.name + IDENTITY_SUFFIX)


def new_ledger_id() -> str:
    return secrets.token_hex(16)


def no_ledger(path: Path | str) -> LedgerError:
    return PhrasedLedgerError(
        N_("no ledger at %(path)s: run `kami-agent init` to create one, or restore it from backup"),
        path=path,
    )


def check_ledger_file(path: Path) -> None:
    """Refuses, before SQLite sees it, a path that holds no ledger: missing, a directory,
    empty, unreadable, or not an SQLite file."""
    try:
        with path.open("rb") as handle:
            header = handle.read(len(SQLITE_HEADER))
    except FileNotFoundError:
        raise no_ledger(path) from None
    except IsADirectoryError:
        raise PhrasedLedgerError(
            N_(
                "the ledger path %(path)s is a directory, not a ledger file: set [store] path to"
                " the ledger file"
            ),
            path=path,
        ) from None
    except OSError as exc:
        raise LedgerError(os_error_text(path, exc)) from None
    if not header:
        raise PhrasedLedgerError(
            N_(
                "the ledger %(path)s is empty (0 bytes): it is not a ledger any more; restore it"
                " from backup (only `kami-agent init` makes a new ledger, and only where none is)"
            ),
            path=path,
        )
    if header != SQLITE_HEADER:
        raise PhrasedLedgerError(
            N_(
                "%(path)s is not a kami-agent ledger (not an SQLite database): restore the ledger"
                " from backup, or correct [store] path"
            ),
            path=path,
        )


def read_identity(ledger: Path) -> str | None:
    """The ledger id recorded beside the ledger, or None if there is no identity file."""
    path = identity_path(ledger)
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise LedgerError(os_error_text(path, exc)) from None
    try:
        value = json.loads(raw)["ledger_id"]
    except (ValueError, KeyError, TypeError):
        value = None
    if not isinstance(value, str) or not value:
        raise PhrasedLedgerError(
            N_("the identity file %(path)s is damaged: restore it from backup"), path=path
        )
    return value


def write_identity(ledger: Path, ledger_id: str) -> Path:
    """Records the id beside the ledger: written whole (temp file, fsync, link) or not at
    all, private, and never over an existing identity file."""
    target = identity_path(ledger)
    temp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    record = {"ledger_id": ledger_id, "ledger": str(ledger), "created_at": time.time()}
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, (json.dumps(record) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(temp, target)  # unlike rename, fails if the target exists
        except FileExistsError:
            raise PhrasedLedgerError(
                N_(
                    "an identity file %(path)s already exists: it belongs to another ledger;"
                    " nothing changed"
                ),
                path=target,
            ) from None
        finally:
            os.unlink(temp)
        fsync_dir(target.parent)
    except OSError as exc:
        raise LedgerError(os_error_text(target, exc)) from None
    return target


def fsync_dir(folder: Path) -> None:
    """A new name in the folder made durable (its directory entry synced)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def compare(ledger: Path, in_ledger: str | None, recorded: str | None) -> bool:
    """Whether the ledger must be adopted (made before ledgers had ids: no id, no identity
    file); raises if the ledger is not the one this shop set up."""
    where = identity_path(ledger)
    if in_ledger is not None and recorded is not None:
        if in_ledger != recorded:
            raise PhrasedLedgerError(
                N_(
                    "the ledger %(ledger)s was replaced: its id %(id)s is not %(recorded)s, the"
                    " one recorded in %(where)s; put this shop's ledger back (or restore it from"
                    " backup)"
                ),
                ledger=ledger,
                id=in_ledger,
                recorded=recorded,
                where=where,
            )
        return False
    if in_ledger is None and recorded is not None:
        raise PhrasedLedgerError(
            N_(
                "the ledger %(ledger)s was replaced: it carries no id, but %(where)s records"
                " ledger %(recorded)s; put this shop's ledger back (or restore it from backup)"
            ),
            ledger=ledger,
            where=where,
            recorded=recorded,
        )
    if in_ledger is not None:
        raise PhrasedLedgerError(
            N_(
                "the identity file %(where)s of the ledger %(ledger)s (id %(id)s) is missing:"
                " restore it from backup with the ledger; or, if this is certainly the shop's"
                " current ledger, record its id again with `kami-agent init --adopt`"
            ),
            where=where,
            ledger=ledger,
            id=in_ledger,
        )
    return True


def os_error_text(path: Path | str, exc: OSError) -> str:
    """An OSError on a ledger file, in words."""
    what = {
        errno.EACCES: "permission denied",
        errno.EPERM: "operation not permitted",
        errno.EROFS: "read-only file system",
        errno.ENOSPC: "no space left on the device",
        errno.EISDIR: "it is a directory",
        errno.ENOENT: "no such file or directory",
    }.get(exc.errno or 0, exc.strerror or str(exc))
    return f"cannot use {path}: {what}"


def sqlite_error_text(path: Path, exc: sqlite3.Error) -> str:
    """A driver error on the ledger, in words and naming the ledger."""
    text = str(exc)
    if "readonly" in text or "read-only" in text:
        return (
            f"the ledger {path} cannot be written ({text}): the file and its directory must be"
            " writable by the agent (it keeps its -wal and -shm files beside the ledger)"
        )
    if "malformed" in text or "not a database" in text:
        return f"the ledger {path} is damaged ({text}): restore it from backup"
    if "unable to open" in text:
        return (
            f"the ledger {path} cannot be opened ({text}): check that the agent may read and"
            " write the file and its directory"
        )
    if "locked" in text:
        return f"the ledger {path} is locked by another process ({text}); try again"
    if "disk" in text or "full" in text or "I/O" in text:
        return f"the ledger {path} cannot be written ({text}): check the disk"
    return f"the ledger {path} cannot be used: {text}"


class Opening(enum.Enum):
    """How a store opens its ledger."""

    OPEN = "open"  # an existing ledger, checked: every command and the daemon
    CREATE = "create"  # a new ledger where none is: `kami-agent init` (and demo, tests)
    RECORD_IDENTITY = "record-identity"  # `init --adopt`: write a lost identity file again
