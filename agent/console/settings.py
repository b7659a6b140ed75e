"""The [console], [metrics] and [telegram_bot] tables: merchant interfaces, all off by default.

Parsed through agent.config.Section, so a bad value is one ConfigError naming the file and the
key, like every other table.
"""

from __future__ import annotations

import importlib.util
import ipaddress
from dataclasses import dataclass
from urllib.parse import urlparse

from agent.config import Section
from agent.console.passwords import PasswordHashError, check_hash_format
from agent.i18n import language_from_environment

DEFAULT_CONSOLE_PORT = 8790
DEFAULT_METRICS_PORT = 9464


@dataclass(frozen=True, slots=True)
class ConsoleSettings:
    host: str = "127.0.0.1"
    port: int = DEFAULT_CONSOLE_PORT
    # Login: the NAME of a secret holding a token, and/or a password hash (scrypt or pbkdf2).
    token_secret: str | None = None
    password_hash: str | None = None
    language: str = "en"
    # Set when the console is reached over https (a reverse proxy): the session cookie is
    # then sent over https only. A request that arrives over TLS gets it anyway.
    secure_cookie: bool = False
    session_hours: float = 12.0


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    host: str = "127.0.0.1"
    port: int = DEFAULT_METRICS_PORT
    # How often the ledger's figures (stock, backlog, alerts, latencies) are read; a scrape
    # only formats what was read, so Prometheus never adds load on the ledger.
    refresh_seconds: float = 15.0


@dataclass(frozen=True, slots=True)
class TelegramBotSettings:
    token_secret: str
    allowed_chats: tuple[int, ...]
    api_base: str = "https://api.telegram.org"
    language: str = "en"
    poll_seconds: int = 25  # getUpdates long poll
    alert_interval: float = 30.0  # how often open alerts are looked at, to push the new ones


@dataclass(frozen=True, slots=True)
class InterfaceSettings:
    console: ConsoleSettings | None = None
    metrics: MetricsSettings | None = None
    telegram_bot: TelegramBotSettings | None = None

    def secret_names(self) -> list[str]:
        names = []
        if self.console is not None and self.console.token_secret:
            names.append(self.console.token_secret)
        if self.telegram_bot is not None:
            names.append(self.telegram_bot.token_secret)
        return names


def _language(s: Section, default: str) -> str:
    """The daemon's language (agent.language); this table's `language` only to have this
    interface speak another."""
    return s.language("language", default) or default


def _host(s: Section) -> str:
    host = s.string("host", "127.0.0.1")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise s.error("host", f"must be an IP address to listen on, got {host!r}") from None
    return host


def _enabled(s: Section) -> bool:
    """A table turns its interface on; `enabled = false` keeps the table but turns it off."""
    return s.boolean("enabled", True)


def _needs(s: Section, module: str, extra: str) -> None:
    """An interface turned on without its optional dependency: said at config time."""
    if importlib.util.find_spec(module) is None:
        raise s.error(None, f"needs the {module} package: pip install 'kami-agent[{extra}]'")


def parse_console(s: Section, language: str) -> ConsoleSettings | None:
    enabled = _enabled(s)
    if enabled:
        _needs(s, "jinja2", "console")
    password_hash = s.optional_string("password_hash")
    if password_hash is not None:
        try:
            check_hash_format(password_hash)
        except PasswordHashError as exc:
            raise s.error("password_hash", str(exc)) from None
    settings = ConsoleSettings(
        host=_host(s),
        port=s.integer("port", DEFAULT_CONSOLE_PORT, minimum=1, maximum=65535),
        token_secret=s.optional_secret_name("token"),
        password_hash=password_hash,
        language=_language(s, language),
        secure_cookie=s.boolean("secure_cookie", False),
        session_hours=s.number("session_hours", 12.0, minimum=0.05, maximum=24 * 30),
    )
    s.reject_unknown()
    if settings.token_secret is None and settings.password_hash is None:
        raise s.error(
            None,
            "needs a way to log in: token = the NAME of a secret holding a login token, or"
            " password_hash = the output of `python -m agent.console.passwords`",
        )
    return settings if enabled else None


def parse_metrics(s: Section) -> MetricsSettings | None:
    enabled = _enabled(s)
    if enabled:
        _needs(s, "prometheus_client", "metrics")
    settings = MetricsSettings(
        host=_host(s),
        port=s.integer("port", DEFAULT_METRICS_PORT, minimum=1, maximum=65535),
        refresh_seconds=s.number("refresh_seconds", 15.0, minimum=0.05, maximum=3600),
    )
    s.reject_unknown()
    return settings if enabled else None


def _api_base(s: Section) -> str:
    """Telegram's API, or a stand-in; https unless on this machine: the bot's token travels
    in every request's path."""
    if s.data.get("api_base") is None:
        return "https://api.telegram.org"
    url = s.url("api_base")
    parsed = urlparse(url)
    host = parsed.hostname or ""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if parsed.scheme != "https" and not loopback:
        raise s.error("api_base", "must be https (plain http only to this machine)")
    return url


def parse_telegram_bot(s: Section, language: str) -> TelegramBotSettings | None:
    enabled = _enabled(s)
    chats = s.data.get("allowed_chats")
    s.used.add("allowed_chats")
    if (
        not isinstance(chats, list)
        or not chats
        or not all(isinstance(c, int) and not isinstance(c, bool) for c in chats)
    ):
        raise s.error(
            "allowed_chats",
            "must be a non-empty list of Telegram chat ids (numbers); the bot answers no one else",
        )
    settings = TelegramBotSettings(
        token_secret=s.secret_name("token"),
        allowed_chats=tuple(chats),
        api_base=_api_base(s),
        language=_language(s, language),
        poll_seconds=s.integer("poll_seconds", 25, minimum=0, maximum=50),
        alert_interval=s.number("alert_interval", 30.0, minimum=0.05, maximum=3600),
    )
    s.used.add("api_base")
    s.reject_unknown()
    return settings if enabled else None


def parse_interfaces(top: Section, language: str | None = None) -> InterfaceSettings:
    """The three optional tables of the top-level config section; `language`: the daemon's
    (agent.language; the locale's when not given)."""
    language = language or language_from_environment()

    def table(key: str) -> Section | None:
        data = top.table(key)
        return Section(top.source, key, data, top._) if key in top.data else None

    console = table("console")
    metrics = table("metrics")
    bot = table("telegram_bot")
    return InterfaceSettings(
        console=parse_console(console, language) if console is not None else None,
        metrics=parse_metrics(metrics) if metrics is not None else None,
        telegram_bot=parse_telegram_bot(bot, language) if bot is not None else None,
    )
