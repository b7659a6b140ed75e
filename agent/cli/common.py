"""What every command shares: the config, the ledger, bounded numbers, tables and JSON, and
the merchant's language (`_`: the locale's until the config is read, then agent.language)."""

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
from agent.i18n import Translator, format_table, language_from_environment
from agent.secrets import env_var_for, lookup_secret
from agent.store.base import Store
from agent.textsafe import printable

# The CLI's words. Commands import this one object; load() switches it to the config's language.
_ = Translator(language_from_environment())

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
        _(
            "no config file: pass --config, set KAMI_AGENT_CONFIG, or create ./config.toml"
            " (see config.example.toml)"
        )
    )


def load(args: argparse.Namespace) -> Config:
    config = load_config(config_path(args.config))
    _.switch(config.agent.language)
    return config


def require_store_key(config: Config) -> None:
    """Refuses, with the command that helps, when the store key is missing: a new shop makes
    it with `keys init` (typing a key in with `secrets set` would take any text and then fail
    to parse); a ledger already sealed with one needs that very key back."""
    name = config.store.key_secret
    if lookup_secret(name):
        return
    values = {"name": name, "variable": env_var_for(name)}
    if config.store.path is not None and not config.store.path.exists():
        raise CommandError(
            _(
                "secret '%(name)s' is not set: it is the store key; make it with `kami-agent keys"
                " init` (once, before `kami-agent init`), or provide environment variable"
                " %(variable)s"
            )
            % values
        )
    raise CommandError(
        _(
            "secret '%(name)s' is not set: it is the store key the ledger %(ledger)s was sealed"
            " with; restore it from your backup (`kami-agent secrets set %(name)s`, or"
            " environment variable %(variable)s)"
        )
        % (values | {"ledger": config.store.describe()})
    )


def with_store(config: Config, action: Callable[[Store], Awaitable[int]]) -> int:
    """Runs `action` on the opened ledger (never creates one: only `init` does)."""
    require_store_key(config)

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

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                _("not a whole number: %(text)r") % {"text": text[:40]}
            ) from None
        if not low <= value <= high:
            values = {"low": f"{low:,}", "high": f"{high:,}", "text": text[:40]}
            if not unit:
                message = _("must be between %(low)s and %(high)s, got %(text)s") % values
            else:  # the unit inside the message: Chinese puts no space before 之间
                message = _("must be between %(low)s and %(high)s %(unit)s, got %(text)s") % (
                    values | {"unit": _(unit)}  # a unit marked with N_ where it is named
                )
            raise argparse.ArgumentTypeError(message)
        return value

    return parse


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help=_("print JSON instead of a table"))


def print_json(data: Any) -> None:
    """Machine output: keys and values as the ledger has them, in no language."""
    json.dump(data, sys.stdout, ensure_ascii=False, indent=2)
    sys.stdout.write("\n")


def print_table(
    headers: list[str],
    rows: list[list[str]],
    aligns: str | None = None,
    max_widths: list[int | None] | None = None,
) -> None:
    """A table whose columns line up on a terminal with Chinese text in it (widths by display
    cells); every cell made safe to print (textsafe.printable) before it is measured."""
    safe = [[printable(str(cell)) for cell in row] for row in rows]
    for line in format_table(headers, safe, aligns, max_widths):
        print(line)


def confirm(question: str, expected: str, *, assume_yes: bool, refusal: str) -> None:
    """Asks on a terminal (the answer must be `expected`); without one, `assume_yes` must be
    given. Raises CommandError(refusal) otherwise."""
    if assume_yes:
        return
    if not (sys.stdin.isatty() and sys.stderr.isatty()):
        raise CommandError(
            _("%(refusal)s: pass --yes to confirm without a terminal") % {"refusal": refusal}
        )
    sys.stderr.write(
        _("%(question)s [type %(expected)s to confirm] ")
        % {"question": question, "expected": expected}
    )
    sys.stderr.flush()
    try:
        answer = sys.stdin.readline().strip()
    except KeyboardInterrupt:
        answer = ""
    if answer != expected:
        raise CommandError(_("%(refusal)s: not confirmed") % {"refusal": refusal})


class CommandError(AgentError):
    """A command refused or failed in a way the merchant must read: one line, exit 1."""
