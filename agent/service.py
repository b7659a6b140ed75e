"""systemd integration: sd_notify (READY, STATUS, WATCHDOG, STOPPING) without extra deps."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable

from agent.logs import get_logger

log = get_logger("kami.service")


def notify(message: str) -> bool:
    """Sends one sd_notify datagram; a no-op outside systemd. Returns whether it was sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError:
        return False
    return True


def watchdog_interval() -> float | None:
    """Half the WatchdogSec systemd gave us (seconds), or None when the watchdog is off."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2_000_000
    except ValueError:
        return None


async def keep_watchdog(interval: float, progressing: Callable[[], Awaitable[bool]]) -> None:
    """Pings the systemd watchdog every `interval` seconds while `progressing()` says the
    daemon gets work done; runs until cancelled. A task of its own, timed by the monotonic
    clock: as a scheduler job it shared the scheduler's fate, and a step of the wall clock
    stalled it until systemd killed a daemon that was working fine."""
    while True:
        await asyncio.sleep(interval)
        try:
            alive = await progressing()
        except Exception as exc:  # e.g. the ledger does not answer: no ping, systemd acts
            log.warning("watchdog_check_failed", error=str(exc), kind=type(exc).__name__)
            continue
        if alive:
            notify("WATCHDOG=1")
