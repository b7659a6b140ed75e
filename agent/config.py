"""TOML configuration into frozen dataclasses.

Every bad value raises one ConfigError naming the file and the key, so `kami-agent check`
and `kami-agent run` can print a single clear line instead of a traceback.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from agent.domain import AgentError

if TYPE_CHECKING:
    from agent.console.settings import InterfaceSettings

LOG_LEVELS = ("debug", "info", "warning", "error")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# A secret's NAME: words joined by dots (platform.main.secret; a single word like `mytoken`
# too). A token, key or URL pasted in its place does not look like that (other characters,
# or a long run of letters mixed with digits), and is refused without being echoed.
_SECRET_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]+)*$")
_RANDOM_LOOKING_RUN = re.compile(r"(?=[A-Za-z0-9]*[0-9])(?=[A-Za-z0-9]*[A-Za-z])[A-Za-z0-9]{16,}")
MAX_SECRET_NAME = 64
MAX_QUANTITY_LIMIT = 1000


class ConfigError(AgentError):
    """A configuration problem, already phrased for the merchant."""


DEFAULT_DELIVERY_MESSAGE = "Thank you for your order."


@dataclass(frozen=True, slots=True)
class AgentSettings:
    poll_interval: float = 2.0
    # After a poll that found new orders, poll again this soon, until one finds none (0: only
    # every poll_interval), so a stream of orders does not wait for the next scheduled poll.
    busy_poll_interval: float = 0.25
    sweep_interval: float = 5.0
    reconcile_interval: float = 300.0
    concurrency: int = 16
    delivery_message: str = DEFAULT_DELIVERY_MESSAGE
    # How long a delivery may stay ambiguous before we park it for a human.
    max_delivery_attempts: int = 50
    # Backoff between delivery attempts kept in the order row: base * 2^n, capped.
    retry_base: float = 1.0
    retry_cap: float = 300.0
    # A backordered line that can be bought is offered to the suppliers again this often.
    supplier_retry_interval: float = 30.0
    balance_interval: float = 300.0


@dataclass(frozen=True, slots=True)
class StoreSettings:
    """Either `path` (the embedded SQLite ledger) or `url` (PostgreSQL shared by agents)."""

    path: Path | None = None
    # Name of the secret holding the master key that seals card keys at rest.
    key_secret: str = "store.key"
    url: str | None = None
    password_secret: str | None = None  # secret holding the PostgreSQL password, if any
    instance: str | None = None  # this agent's name among those sharing the database
    lease_seconds: float = 60.0
    pool_size: int = 10

    def describe(self) -> str:
        if self.url is not None:
            return self.url
        return str(self.path)


@dataclass(frozen=True, slots=True)
class LogSettings:
    level: str = "info"


@dataclass(frozen=True, slots=True)
class PlatformSettings:
    name: str
    kind: str
    base_url: str
    api_key: str
    secret_name: str
    timeout: float = 10.0
    page_size: int = 100
    # Use the platform's long-poll endpoint (GET /api/v1/orders/wait) when it offers one.
    long_poll: bool = False
    # What only this kind has (its module's parse_options; see agent.platforms.KINDS).
    options: object | None = None


@dataclass(frozen=True, slots=True)
class SupplierSettings:
    name: str
    kind: str
    base_url: str
    api_key: str
    secret_name: str
    timeout: float = 10.0
    # How long a purchase may stay of unknown outcome before a human must look at it.
    unknown_window: float = 600.0
    # Wait after a lost response before re-asking a supplier that has not seen the reference.
    query_grace: float = 10.0
    processing_poll: float = 2.0
    balance_low: Decimal | None = None


LOCAL_SOURCE = "local"


@dataclass(frozen=True, slots=True)
class SkuSettings:
    sku: str
    max_quantity: int = 50
    message: str | None = None
    # Where keys come from, in order: "local" stock and/or supplier names.
    sources: tuple[str, ...] = (LOCAL_SOURCE,)
    max_price: Decimal | None = None
    # The supplier's own product id per supplier, when it differs from our SKU.
    supplier_skus: Mapping[str, str] = field(default_factory=dict)
    # Alert when the forecast says stock lasts less than this (seconds) or falls below min_stock.
    lead_time: float = 3600.0
    min_stock: int = 0
    # An order not delivered within this (seconds) is "stuck" and alerts.
    promise: float = 600.0
    # Refund an order still waiting for stock after this long (seconds); None = never.
    refund_after: float | None = None

    def supplier_sku(self, supplier: str) -> str:
        return self.supplier_skus.get(supplier, self.sku)


@dataclass(frozen=True, slots=True)
class AlertSettings:
    forecast_interval: float = 60.0
    # EWMA half-life of the sales rate: how fast the forecast forgets old sales.
    half_life: float = 3600.0
    escalate_after: float = 3600.0
    max_escalations: int = 3
    outbox_interval: float = 5.0
    # A buyer whose order waits for stock this long gets a notice with an ETA.
    buyer_notice_after: float = 600.0


# Per channel kind: option -> (type, required, default). Secret-valued options name a secret.
NOTIFY_KINDS: dict[str, dict[str, tuple[type, bool, Any]]] = {
    "email": {
        "host": (str, True, None),
        "port": (int, False, 587),
        "starttls": (bool, False, True),
        # "starttls" | "implicit" (SMTPS) | "none"; when absent, starttls = true/false decides.
        "tls": (str, False, None),
        "sender": (str, True, None),
        "to": (list, True, None),
        "username": (str, False, None),
        "password": (str, False, None),
    },
    "webhook": {"url": (str, True, None), "secret": (str, True, None)},
    "telegram": {
        "token": (str, True, None),
        "chat_id": (str, True, None),
        "api_base": (str, False, "https://api.telegram.org"),
    },
    "dingtalk": {"url_secret": (str, True, None), "sign_secret": (str, False, None)},
    "wecom": {"url_secret": (str, True, None)},
    "feishu": {"url_secret": (str, True, None), "sign_secret": (str, False, None)},
    # Prints alerts to the daemon's own output (the demo uses it; handy for a first setup).
    "console": {},
}
SECRET_OPTIONS = ("password", "secret", "token", "url_secret", "sign_secret")


@dataclass(frozen=True, slots=True)
class NotifySettings:
    name: str
    kind: str
    options: Mapping[str, Any]

    def secret_names(self) -> list[str]:
        return [self.options[k] for k in SECRET_OPTIONS if self.options.get(k)]


@dataclass(frozen=True, slots=True)
class Config:
    source: Path
    agent: AgentSettings
    store: StoreSettings
    log: LogSettings
    platforms: tuple[PlatformSettings, ...]
    skus: Mapping[str, SkuSettings] = field(default_factory=dict)
    suppliers: tuple[SupplierSettings, ...] = ()
    alerts: AlertSettings = field(default_factory=AlertSettings)
    notify: tuple[NotifySettings, ...] = ()
    # [console], [metrics], [telegram_bot] (agent.console.settings); None: all off.
    interfaces: InterfaceSettings | None = None

    def secret_names(self) -> list[str]:
        """Every secret the config refers to, by name."""
        names = [self.store.key_secret]
        names += self.interfaces.secret_names() if self.interfaces else []
        if self.store.password_secret:
            names.append(self.store.password_secret)
        names += [p.secret_name for p in self.platforms] + [s.secret_name for s in self.suppliers]
        for channel in self.notify:
            names.extend(channel.secret_names())
        return names


class Section:
    """Reads one TOML table, remembering which keys were used to reject typos. Adapters read
    their own keys through it (see agent.platforms.KINDS)."""

    def __init__(self, source: Path, where: str, data: Any) -> None:
        self.source = source
        self.where = where
        if not isinstance(data, dict):
            raise self.error(None, f"must be a table, got {type(data).__name__}")
        self.data: dict[str, Any] = data
        self.used: set[str] = set()

    def error(self, key: str | None, message: str) -> ConfigError:
        name = f"{self.where}.{key}" if key and self.where else (key or self.where or "(top)")
        return ConfigError(f"{self.source}: {name}: {message}")

    def _get(self, key: str) -> Any:
        self.used.add(key)
        return self.data.get(key)

    def string(self, key: str, default: str | None = None, *, required: bool = False) -> str:
        value = self._get(key)
        if value is None:
            if required or default is None:
                raise self.error(key, "is required")
            return default
        if not isinstance(value, str) or not value.strip():
            raise self.error(key, f"must be a non-empty string, got {value!r}")
        return value

    def secret_name(self, key: str, default: str | None = None) -> str:
        """The name of a secret (required unless `default`); never echoes what it refuses."""
        value = self._get(key)
        if value is None:
            if default is None:
                raise self.error(key, "is required (the name of a secret)")
            return default
        return self.check_secret_name(key, value)

    def optional_secret_name(self, key: str) -> str | None:
        value = self._get(key)
        return None if value is None else self.check_secret_name(key, value)

    def check_secret_name(self, key: str, value: Any) -> str:
        if (
            isinstance(value, str)
            and len(value) <= MAX_SECRET_NAME
            and _SECRET_NAME_RE.match(value)
            and not _RANDOM_LOOKING_RUN.search(value)
        ):
            return value
        example = re.sub(r"[^a-z0-9_.-]", "-", f"{self.where}.{key}".lower()).strip(".")
        raise self.error(
            key,
            "must be the NAME of a secret (words joined by dots, like "
            f"{example}), not the secret itself; the value was not printed",
        )

    def optional_string(self, key: str) -> str | None:
        value = self._get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.error(key, f"must be a string, got {value!r}")
        return value

    def number(self, key: str, default: float, *, minimum: float, maximum: float) -> float:
        value = self._get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(key, f"must be a number, got {value!r}")
        if not minimum <= value <= maximum:
            raise self.error(key, f"must be between {minimum} and {maximum}, got {value}")
        return float(value)

    def integer(self, key: str, default: int, *, minimum: int, maximum: int) -> int:
        value = self._get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"must be a whole number, got {value!r}")
        if not minimum <= value <= maximum:
            raise self.error(key, f"must be between {minimum} and {maximum}, got {value}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self._get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, got {value!r}")
        return value

    def url(self, key: str) -> str:
        value = self.string(key, required=True)
        parsed = urlparse(value)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise self.error(key, f"must be an http(s) URL, got {value!r}")
        return value.rstrip("/")

    def table(self, key: str) -> dict[str, Any]:
        value = self._get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.error(key, f"must be a table, got {type(value).__name__}")
        return value

    def reject_unknown(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise self.error(unknown[0], "is not a known setting (typo?)")


def load_config(path: Path | str) -> Config:
    source = Path(path)
    try:
        raw = source.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read config file: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{source}: config file is not valid UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from None
    return parse_config(data, source)


def parse_config(data: dict[str, Any], source: Path) -> Config:
    top = Section(source, "", data)
    agent = _parse_agent(Section(source, "agent", top.table("agent")))
    store = _parse_store(Section(source, "store", top.table("store")), source)
    log_section = Section(source, "log", top.table("log"))
    level = log_section.string("level", "info").lower()
    if level not in LOG_LEVELS:
        raise log_section.error("level", f"must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
    log_section.reject_unknown()

    platforms_table = top.table("platforms")
    if not platforms_table:
        raise top.error("platforms", "at least one [platforms.<name>] table is required")
    platforms = tuple(
        _parse_platform(name, Section(source, f"platforms.{name}", value), top)
        for name, value in platforms_table.items()
    )
    suppliers = tuple(
        _parse_supplier(name, Section(source, f"suppliers.{name}", value), top)
        for name, value in top.table("suppliers").items()
    )
    supplier_names = {s.name for s in suppliers}
    skus = {
        sku: _parse_sku(sku, Section(source, f"skus.{sku}", value), top, supplier_names)
        for sku, value in top.table("skus").items()
    }
    alerts = _parse_alerts(Section(source, "alerts", top.table("alerts")))
    notify = tuple(
        _parse_notify(name, Section(source, f"notify.{name}", value), top)
        for name, value in top.table("notify").items()
    )
    from agent.console.settings import parse_interfaces  # it reads tables through Section

    interfaces = parse_interfaces(top)
    top.reject_unknown()
    return Config(
        interfaces=interfaces,
        source=source,
        agent=agent,
        store=store,
        log=LogSettings(level=level),
        platforms=platforms,
        skus=skus,
        suppliers=suppliers,
        alerts=alerts,
        notify=notify,
    )


def _parse_agent(s: Section) -> AgentSettings:
    settings = AgentSettings(
        poll_interval=s.number("poll_interval", 2.0, minimum=0.05, maximum=3600),
        busy_poll_interval=s.number("busy_poll_interval", 0.25, minimum=0.0, maximum=3600),
        sweep_interval=s.number("sweep_interval", 5.0, minimum=0.05, maximum=3600),
        reconcile_interval=s.number("reconcile_interval", 300.0, minimum=1, maximum=86400),
        concurrency=s.integer("concurrency", 16, minimum=1, maximum=512),
        delivery_message=s.string("delivery_message", DEFAULT_DELIVERY_MESSAGE),
        max_delivery_attempts=s.integer("max_delivery_attempts", 50, minimum=1, maximum=10_000),
        retry_base=s.number("retry_base", 1.0, minimum=0.01, maximum=3600),
        retry_cap=s.number("retry_cap", 300.0, minimum=0.01, maximum=86400),
        supplier_retry_interval=s.number(
            "supplier_retry_interval", 30.0, minimum=0.01, maximum=86400
        ),
        balance_interval=s.number("balance_interval", 300.0, minimum=1, maximum=86400),
    )
    s.reject_unknown()
    return settings


def _parse_store(s: Section, source: Path) -> StoreSettings:
    key_secret = s.secret_name("key", "store.key")
    raw_path = s.optional_string("path")
    url = s.optional_string("url")
    if (raw_path is None) == (url is None):
        raise s.error(None, "needs exactly one of path (SQLite) or url (PostgreSQL)")
    if url is not None:
        settings = _parse_postgres(s, url, key_secret)
        s.reject_unknown()
        return settings
    assert raw_path is not None
    path = Path(raw_path).expanduser()
    if not path.is_absolute():
        # Relative to the config file, not to wherever systemd happens to start us.
        path = source.parent / path
    s.reject_unknown()
    return StoreSettings(path=path, key_secret=key_secret)


def _parse_postgres(s: Section, url: str, key_secret: str) -> StoreSettings:
    parsed = urlparse(url)
    if parsed.scheme not in ("postgresql", "postgres") or not parsed.hostname:
        raise s.error("url", f"must be a postgresql://user@host:port/database URL, got {url!r}")
    if parsed.password:
        # Config files get copied around; the password lives in a secret instead.
        raise s.error(
            "url",
            "must not contain a password; name a secret in store.password instead"
            " (kami-agent secrets set <name>)",
        )
    return StoreSettings(
        key_secret=key_secret,
        url=url,
        password_secret=s.optional_secret_name("password"),
        instance=s.optional_string("instance"),
        lease_seconds=s.number("lease_seconds", 60.0, minimum=2.0, maximum=3600.0),
        pool_size=s.integer("pool_size", 10, minimum=2, maximum=100),
    )


def _endpoint(s: Section, what: str, kinds: tuple[str, ...]) -> dict[str, Any]:
    """What platforms and suppliers share: protocol kind, where, and how to sign."""
    kind = s.string("kind", kinds[0])
    if kind not in kinds:
        raise s.error("kind", f"unknown {what} kind {kind!r} (known: {', '.join(kinds)})")
    return {
        "kind": kind,
        "base_url": s.url("base_url"),
        "api_key": s.string("api_key", required=True),
        "secret_name": s.secret_name("secret"),
        "timeout": s.number("timeout", 10.0, minimum=0.1, maximum=300),
    }


def _parse_platform(name: str, s: Section, top: Section) -> PlatformSettings:
    if not _NAME_RE.match(name):
        raise top.error(f"platforms.{name}", "name must be letters, digits, '.', '_' or '-'")
    from agent.platforms import KINDS, kind_module  # adapters import this module

    endpoint = _endpoint(s, "platform", tuple(KINDS))
    settings = PlatformSettings(
        name=name,
        **endpoint,
        page_size=s.integer("page_size", 100, minimum=1, maximum=1000),
        long_poll=s.boolean("long_poll", False),
        options=kind_module(endpoint["kind"]).parse_options(s),
    )
    s.reject_unknown()
    return settings


def _parse_sku(sku: str, s: Section, top: Section, suppliers: set[str]) -> SkuSettings:
    if not sku.strip() or len(sku) > 128:
        raise top.error(f"skus.{sku}", "SKU must be 1 to 128 characters")
    sources = s._get("sources")
    if sources is None:
        sources = [LOCAL_SOURCE]
    if not isinstance(sources, list) or not sources or not all(isinstance(x, str) for x in sources):
        raise s.error("sources", f"must be a non-empty list of names, got {sources!r}")
    for name in sources:
        if name != LOCAL_SOURCE and name not in suppliers:
            raise s.error("sources", f"{name!r} is neither 'local' nor a [suppliers.*] name")
    if len(set(sources)) != len(sources):
        raise s.error("sources", "lists a source twice")
    max_price = _decimal(s, "max_price")
    supplier_skus = s.table("supplier_sku")
    for name, value in supplier_skus.items():
        if name not in suppliers or not isinstance(value, str) or not value:
            raise s.error(f"supplier_sku.{name}", "must map a configured supplier to a product id")
    settings = SkuSettings(
        sku=sku,
        max_quantity=s.integer("max_quantity", 50, minimum=1, maximum=MAX_QUANTITY_LIMIT),
        message=s.optional_string("message"),
        sources=tuple(sources),
        max_price=max_price,
        supplier_skus=dict(supplier_skus),
        lead_time=s.number("lead_time", 3600.0, minimum=0, maximum=30 * 86400),
        min_stock=s.integer("min_stock", 0, minimum=0, maximum=10_000_000),
        promise=s.number("promise", 600.0, minimum=1, maximum=30 * 86400),
        refund_after=(
            s.number("refund_after", 0.0, minimum=60, maximum=90 * 86400)
            if s.data.get("refund_after") is not None
            else None
        ),
    )
    s.reject_unknown()
    return settings


def _decimal(s: Section, key: str) -> Decimal | None:
    raw = s._get(key)
    if raw is None:
        return None
    try:
        value = Decimal(str(raw))
    except InvalidOperation:
        raise s.error(key, f"must be a decimal amount, got {raw!r}") from None
    if not value.is_finite() or value <= 0:
        raise s.error(key, f"must be a positive amount, got {raw!r}")
    return value


def _parse_alerts(s: Section) -> AlertSettings:
    settings = AlertSettings(
        forecast_interval=s.number("forecast_interval", 60.0, minimum=0.05, maximum=86400),
        half_life=s.number("half_life", 3600.0, minimum=1, maximum=30 * 86400),
        escalate_after=s.number("escalate_after", 3600.0, minimum=1, maximum=30 * 86400),
        max_escalations=s.integer("max_escalations", 3, minimum=0, maximum=100),
        outbox_interval=s.number("outbox_interval", 5.0, minimum=0.05, maximum=3600),
        buyer_notice_after=s.number("buyer_notice_after", 600.0, minimum=1, maximum=30 * 86400),
    )
    s.reject_unknown()
    return settings


def _parse_notify(name: str, s: Section, top: Section) -> NotifySettings:
    if not _NAME_RE.match(name):
        raise top.error(f"notify.{name}", "name must be letters, digits, '.', '_' or '-'")
    kind = s.string("kind", required=True)
    spec = NOTIFY_KINDS.get(kind)
    if spec is None:
        raise s.error("kind", f"unknown channel kind {kind!r} (known: {', '.join(NOTIFY_KINDS)})")
    options: dict[str, Any] = {}
    for key, (kind_type, required, default) in spec.items():
        value = s._get(key)
        if value is None:
            if required:
                raise s.error(key, f"is required for a {kind} channel")
            options[key] = default
            continue
        if key in SECRET_OPTIONS:
            value = s.check_secret_name(key, value)
        if kind_type is list:
            if (
                not isinstance(value, list)
                or not value
                or not all(isinstance(v, str) for v in value)
            ):
                raise s.error(key, f"must be a non-empty list of strings, got {value!r}")
            value = tuple(value)
        elif kind_type is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise s.error(key, f"must be a whole number, got {value!r}")
        elif kind_type is not int and not isinstance(value, kind_type):
            raise s.error(key, f"must be a {kind_type.__name__}, got {value!r}")
        options[key] = value
    for key in ("url", "api_base"):
        if s.data.get(key) is not None:  # a default (api_base) is not read from the file
            options[key] = s.url(key)
    if kind == "email":
        _email_tls(s, options)
    s.reject_unknown()
    return NotifySettings(name=name, kind=kind, options=options)


EMAIL_TLS = ("starttls", "implicit", "none")


def _email_tls(s: Section, options: dict[str, Any]) -> None:
    tls = options["tls"]
    if tls is None:
        tls = "starttls" if options["starttls"] else "none"
    elif tls not in EMAIL_TLS:
        raise s.error("tls", f"must be one of {', '.join(EMAIL_TLS)}, got {tls!r}")
    elif s.data.get("starttls") is not None and options["starttls"] != (tls == "starttls"):
        raise s.error("starttls", f'contradicts tls = "{tls}"; set tls alone')
    options["tls"] = tls
    if tls == "implicit" and s.data.get("port") is None:
        options["port"] = 465  # SMTPS
    if options.get("password") and tls == "none":
        raise s.error(
            "password",
            'is never sent over SMTP without TLS; set tls = "starttls" (usually port 587)'
            ' or tls = "implicit" (usually port 465)',
        )


SUPPLIER_KINDS = ("http", "fulu")


def _parse_supplier(name: str, s: Section, top: Section) -> SupplierSettings:
    if not _NAME_RE.match(name) or name == LOCAL_SOURCE:
        raise top.error(
            f"suppliers.{name}", "name must be letters, digits, '.', '_' or '-' and not 'local'"
        )
    settings = SupplierSettings(
        name=name,
        **_endpoint(s, "supplier", SUPPLIER_KINDS),
        unknown_window=s.number("unknown_window", 600.0, minimum=1, maximum=7 * 86400),
        query_grace=s.number("query_grace", 10.0, minimum=0, maximum=3600),
        processing_poll=s.number("processing_poll", 2.0, minimum=0.05, maximum=3600),
        balance_low=_decimal(s, "balance_low"),
    )
    s.reject_unknown()
    return settings
