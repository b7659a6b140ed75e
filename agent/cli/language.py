"""The CLI's language before its parser is built: `--help`, argparse's own words and an
argument error speak the merchant's language too, not only what runs after the config is read;
and help text wrapped by display width (Chinese takes two cells a character).

The language is the config's `[agent] language` when the file can be read cheaply (found the way
`load` finds it, small, valid TOML); otherwise the locale's. A config that cannot be read here is
reported by `load` later, in that language.
"""

from __future__ import annotations

import argparse
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from agent.i18n import (
    N_,
    Translator,
    display_width,
    language_from_environment,
    normalise_language,
)

# A config file is a few kilobytes; anything much larger is not worth reading twice.
MAX_PEEK_BYTES = 1 << 20

# argparse's own merchant-visible words (it looks them up through its module's `_`, which
# speak_argparse points at our catalog); listed here so that they are extracted and translated.
# Its errors about how a parser is built are for us, not the merchant, and stay English.
ARGPARSE_MESSAGES = (
    N_("usage: "),
    N_("options"),
    N_("positional arguments"),
    N_("show this help message and exit"),
    N_("%(prog)s: error: %(message)s\n"),
    N_("argument %(argument_name)s: %(message)s"),
    N_("invalid choice: %(value)r (choose from %(choices)s)"),
    N_("the following arguments are required: %s"),
    N_("unrecognized arguments: %s"),
    N_("expected one argument"),
    N_("expected at least one argument"),
    N_("expected at most one argument"),
    N_("invalid %(type)s value: %(value)r"),
    N_("not allowed with argument %s"),
    N_("one of the arguments %s is required"),
    N_("ambiguous option: %(option)s could match %(matches)s"),
    N_("ignored explicit argument %r"),
    N_("unknown parser %(parser_name)r (choices: %(choices)s)"),
)


def config_argument(argv: Sequence[str]) -> str | None:
    """The value of the top-level --config/-c in `argv` (as argparse would read it: `-c F`,
    `-cF`, `--config F`, `--config=F`, an abbreviation such as `--conf F`)."""
    tokens = list(argv)
    for index, token in enumerate(tokens):
        if token == "--":
            return None
        following = tokens[index + 1] if index + 1 < len(tokens) else None
        if token == "-c":
            return following
        if token.startswith("-c"):
            return token[2:]
        name, equals, value = token.partition("=")
        if len(name) >= 3 and "--config".startswith(name):
            return value if equals else following
    return None


def config_language(path: Path) -> str | None:
    """`[agent] language` of the config at `path` as one of our languages; None when the file
    cannot be read cheaply or names none."""
    try:
        if path.stat().st_size > MAX_PEEK_BYTES:
            return None
        raw = path.read_bytes()
        data = tomllib.loads(raw.removeprefix(b"\xef\xbb\xbf").decode("utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    agent = data.get("agent")
    value = agent.get("language") if isinstance(agent, dict) else None
    return normalise_language(value) if isinstance(value, str) else None


def early_language(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> str:
    """The language for the parser: the config's, else the locale's."""
    from agent.cli.common import DEFAULT_CONFIG_PATHS

    env = os.environ if environ is None else environ
    named = config_argument(argv) or env.get("KAMI_AGENT_CONFIG")
    candidates = [Path(named)] if named else [p for p in DEFAULT_CONFIG_PATHS if p.exists()][:1]
    for path in candidates:
        found = config_language(path)
        if found is not None:
            return found
    return language_from_environment(env)


def speak_argparse(translator: Translator) -> None:
    """argparse's "usage:", "options", its help line and its errors in `translator`'s
    language. argparse reads the `_` and `ngettext` of its module at each call (Python 3.11 to
    3.13), so pointing them at our catalog is enough; an unknown message stays English."""
    argparse._ = translator.gettext  # type: ignore[attr-defined]
    argparse.ngettext = translator.ngettext  # type: ignore[attr-defined]


def _wrap(text: str, width: int) -> list[str]:
    """`text` in lines of at most `width` terminal cells: Latin words kept whole, Chinese
    broken between any two characters (textwrap counts characters, and a Chinese one takes
    two cells, so argparse's help ran past the terminal's edge)."""
    lines: list[str] = []
    line, used = "", 0
    for token in _TOKENS.findall(" ".join(text.split())):
        cells = display_width(token)
        if token == " ":
            if line:
                line, used = line + " ", used + 1
            continue
        if used + cells > width and line.strip():
            lines.append(line.rstrip())
            line, used = "", 0
        line, used = line + token, used + cells
    if line.strip():
        lines.append(line.rstrip())
    return lines


# A space, a run of other ASCII (a word, an option, a path), or any one other character.
_TOKENS = re.compile(r" |[!-~]+|[^ !-~]")


class HelpFormatter(argparse.HelpFormatter):
    """argparse's help, wrapped by display width when it holds Chinese."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        if text.isascii():
            return super()._split_lines(text, width)
        return _wrap(text, width)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.isascii():
            return super()._fill_text(text, width, indent)
        return "\n".join(indent + line for line in _wrap(text, width - len(indent)))

    def start_section(self, heading: str | None) -> None:
        if heading and not heading.isascii():
            self._wide_headings: set[str] = getattr(self, "_wide_headings", set())
            self._wide_headings.add(heading)
        super().start_section(heading)

    def format_help(self) -> str:
        # argparse ends every section heading with an ASCII ":"; a Chinese one ("位置参数",
        # "选项") takes the full-width "：", as "用法：" does.
        headings: set[str] = getattr(self, "_wide_headings", set())
        lines = super().format_help().split("\n")
        for index, line in enumerate(lines):
            if line.endswith(":") and line.lstrip(" ")[:-1] in headings:
                lines[index] = line[:-1] + "："
        return "\n".join(lines)

    def _format_usage(
        self, usage: str | None, actions: Any, groups: Any, prefix: str | None
    ) -> str:
        # "用法：" takes three characters but six cells: wrap the usage that much narrower,
        # and indent its continuation lines under the program's name.
        if prefix is None:
            prefix = argparse._("usage: ")  # type: ignore[attr-defined]
        extra = display_width(prefix) - len(prefix)
        self._width -= extra
        try:
            text = super()._format_usage(usage, actions, groups, prefix)
        finally:
            self._width += extra
        if not extra:
            return text
        first, *rest = text.split("\n")
        return "\n".join([first, *(" " * extra + line if line else line for line in rest)])


class RawDescriptionHelpFormatter(HelpFormatter):
    """A description kept as written (its own line breaks); option help wrapped as above."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "".join(indent + line for line in text.splitlines(keepends=True))


class ArgumentParser(argparse.ArgumentParser):
    """The CLI's parser: its subcommands' parsers are of this class too (argparse makes them
    of the parent's class), so every one wraps its help by display width."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
