"""What every command shares: the config, the ledger, bounded numbers, tables and JSON."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.config import Config, ConfigError, load_config
from agent.domain import AgentError
from agent.store.base import Store

DEFAULT_CONFIG_PATHS = (Path("config.toml"), Path("/etc/kami-agent/config.toml"))
# The most rows any listing shows at once: more is a database dump, not a listing.
MAX_LIMIT = 1_000_000


def config_path(arg: str | None) -> Path:
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


def load(args: argparse.Namespace) -> Config:
    return load_config(config_path(args.config))


def with_store(config: Config, action: Callable[[Store], Awaitable[int]]) -> int:
    """Runs `action` on the opened ledger (never creates one: only `init` does)."""

    async def run() -> int:
        from agent.runtime import open_store

        store = open_store(config.store)
        await store.open()
        try:
            return await action(store)
        finally:
            await store.close()

    return asyncio.run(run())


def when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat()


def bounded_int(low: int, high: int, unit: str = "") -> Callable[[str], int]:
    """An argparse type: an integer within [low, high], else one line saying so."""
    suffix = f" {unit}" if unit else ""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text[:40]!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(
                f"must be between {low:,} and {high:,}{suffix}, got {text[:40]}"
            )
        return value

    return parse


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, ensure_ascii=False, indent=2)
    sys.stdout.write("\n")


def confirm(question: str, expected: str, *, assume_yes: bool, refusal: str) -> None:
    """Asks on a terminal (the answer must be `expected`); without one, `assume_yes` must be
    given. Raises CommandError(refusal) otherwise."""
    if assume_yes:
        return
    if not (sys.stdin.isatty() and sys.stderr.isatty()):
        raise CommandError(f"{refusal}: pass --yes to confirm without a terminal")
    sys.stderr.write(f"{question} [type {expected} to confirm] ")
    sys.stderr.flush()
    try:
        answer = sys.stdin.readline().strip()
    except KeyboardInterrupt:
        answer = ""
    if answer != expected:
        raise CommandError(f"{refusal}: not confirmed")


class CommandError(AgentError):
    """A command refused or failed in a way the merchant must read: one line, exit 1."""
