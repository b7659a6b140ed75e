"""Command line: init, run, demo, check, status, stock, orders, notify, secrets, keys,
install-service.

Every failure a merchant can cause ends in one line naming what is wrong, never a traceback:
config errors exit 2, other errors 1, an interrupted command 130, and output cut short by its
reader (`| head`) ends quietly.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Sequence

from agent.cli import ops, orders, secret_cmds, stock
from agent.cli.common import CommandError, _
from agent.cli.language import ArgumentParser, early_language, speak_argparse
from agent.config import ConfigError
from agent.credstore import CredStoreError
from agent.domain import AgentError
from agent.phrased import say
from agent.store.base import StoreError
from agent.textsafe import printable


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("kami-agent")
    except PackageNotFoundError:
        from agent import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="kami-agent",
        description=_(
            "Command line: init, run, demo, check, status, stock, orders, notify, secrets,"
            " keys, install-service."
        ),
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"kami-agent {version()}",
        help=_("show program's version number and exit"),
    )
    parser.add_argument(
        "-c",
        "--config",
        help=_(
            "config file (default: $KAMI_AGENT_CONFIG, ./config.toml, /etc/kami-agent/config.toml)"
        ),
    )
    sub = parser.add_subparsers(dest="command", required=True)
    ops.add_parsers(sub)
    stock.add_parsers(sub)
    orders.add_parsers(sub)
    secret_cmds.add_parsers(sub)
    from agent import install_service

    install_service.add_parser(sub)
    _name_subcommands(parser)
    return parser


def _name_subcommands(parser: argparse.ArgumentParser) -> None:
    """A missing subcommand is named by its choices (`{list,show,...}`), as the usage line
    shows them, not by the parser's internal name for it (`orders_cmd`)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            if action.metavar is None:
                action.metavar = "{" + ",".join(action.choices) + "}"
            for child in action.choices.values():
                _name_subcommands(child)


def _quiet_broken_pipe() -> int:
    """The reader of our output went away (`kami-agent orders list | head`): nothing to say,
    and nothing more to write (flushing at exit would raise again)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 141  # 128 + SIGPIPE, as a shell reports a command killed by it


def _error(text: str) -> None:
    with contextlib.suppress(BrokenPipeError):
        print(_("kami-agent: error: %(what)s") % {"what": printable(text)}, file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # The language first: the parser's help and argparse's errors speak it too.
    _.switch(early_language(argv))
    speak_argparse(_)
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        code = func(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handlers below
        return code
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except ConfigError as exc:
        with contextlib.suppress(BrokenPipeError):
            print(_("kami-agent: config error: %(what)s") % {"what": exc}, file=sys.stderr)
        return 2
    except (AgentError, StoreError, CommandError, CredStoreError) as exc:
        _error(say(exc, _))  # a phrased error in the merchant's language, others as raised
        return 1
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        # A file the merchant named that cannot be used: its name and why, in one line.
        where = f" {exc.filename}" if exc.filename else ""
        _error(f"{(exc.strerror or type(exc).__name__).lower()}:{where}")
        return 1
