"""The daemon's watch on its ledger: a ledger file deleted or replaced while the agent runs.

SQLite keeps writing to a deleted file as if nothing happened (the open descriptor keeps
it alive), and after a file is swapped in its place the agent still writes to the old one.
Every few seconds the store compares the file it opened with the one at its path; once they
differ the daemon stops taking orders, lets the workers finish the lines in hand (their keys
are bound in the ledger it holds open), and exits non-zero, so systemd starts it again and
the start-up checks refuse the missing or foreign ledger with one clear line. The alert goes
straight to the channels: the outbox lives in the ledger that is gone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

from agent.domain import AgentError, AlertMessage
from agent.i18n import ENGLISH, Translator
from agent.logs import get_logger
from agent.notify.base import Notifier
from agent.store.base import Store

log = get_logger("kami.ledger_watch")
LEDGER_WATCH_SECONDS = 2.0
ALERT_TIMEOUT_SECONDS = 10.0
# The exit code after the ledger went away (EX_SOFTWARE would say "bug"; 1 says "failed").
EXIT_LEDGER_LOST = 1


async def watch_ledger(
    store: Store, on_lost: Callable[[str], None], interval: float = LEDGER_WATCH_SECONDS
) -> None:
    """Calls on_lost(reason) once the store's ledger is not the one at its path any more.
    asyncio.sleep runs on the loop's monotonic clock: a wall-clock step changes nothing."""
    while True:
        await asyncio.sleep(interval)
        reason = store.ledger_lost()
        if reason is not None:
            log.error("ledger_lost", reason=reason, action="stopped taking orders, exiting")
            on_lost(reason)
            return


async def alert_ledger_lost(
    notifiers: Iterable[Notifier], reason: str, now: float, language: str = ENGLISH
) -> None:
    """Tells every channel, best effort: each gets one try, bounded in time."""
    _ = Translator(language)
    summary = _(
        "%(reason)s: the agent stopped taking orders and exited; restore the ledger (it"
        " will not start on a missing or replaced ledger)"
    ) % {"reason": reason}
    await alert_channels(notifiers, "ledger_lost", summary, now, language)


async def alert_restored_keys(
    notifiers: Iterable[Notifier], set_aside: dict[str, int], now: float, language: str = ENGLISH
) -> None:
    """The start-up found keys this ledger holds as free that its bound-keys journal says
    were let out (a ledger restored from an older backup): they were set aside, and the
    merchant must hear it at once (agent/store/bound_journal.py)."""
    _ = Translator(language)
    skus = ", ".join(f"{sku} x{n}" for sku, n in sorted(set_aside.items()))
    summary = _(
        "the ledger is older than its bound-keys journal (restored from a backup?): %(n)d card"
        " keys it held as free were already let out after that backup and are set aside as void"
        " (%(skus)s); import fresh stock, and return a key to stock only if you know it was"
        " never delivered"
    ) % {"n": sum(set_aside.values()), "skus": skus}
    await alert_channels(notifiers, "restored_keys", summary, now, language, "warning")


async def alert_channels(
    notifiers: Iterable[Notifier],
    kind: str,
    summary: str,
    now: float,
    language: str,
    severity: str = "critical",
) -> None:
    """An alert straight to every channel (not through the outbox), best effort: each
    channel gets one try, bounded in time."""
    message = AlertMessage(
        key=kind,
        kind=kind,
        event="opened",
        severity=severity,
        summary=summary,
        at=now,
        language=language,
    )
    for notifier in notifiers:
        try:
            async with asyncio.timeout(ALERT_TIMEOUT_SECONDS):
                await notifier.send(message)
        except (AgentError, TimeoutError) as exc:
            log.warning("alert_failed", kind=kind, channel=notifier.name, error=str(exc))
