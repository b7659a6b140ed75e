"""The settings types: frozen dataclasses, each field's default, range, unit and help written
once, as field metadata (see `setting`).

agent/config.py reads TOML into these through that metadata, and the README's configuration
table is generated from it: `python -m agent.settings --markdown` (a test checks that the README
shows what this prints). Adapters with settings of their own (alert channels, platform kinds)
declare them the same way in their own modules; their registries list them.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
from collections.abc import Iterator, Mapping
from dataclasses import MISSING, dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.i18n import LANGUAGES, N_, Translator

if TYPE_CHECKING:
    from agent.console.settings import InterfaceSettings
    from agent.listener_settings import ListenerSettings

SPEC = "kami.setting"
DAY = 86400.0
MAX_QUANTITY_LIMIT = 1000
# Sent with the keys when neither [agent] nor the SKU has a message: in the buyers' language.
DEFAULT_DELIVERY_MESSAGE = N_("Thank you for your order.")
LOCAL_SOURCE = "local"
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True, slots=True)
class Spec:
    """How one setting is read, checked and documented.

    `reader` says how the loader reads it when the default's type does not (see
    agent.config.READERS); `key` is its TOML key when that differs from the field's name;
    `shown` is the default as documented when the field's own default is not what a merchant
    gets (a host name, a first registered kind)."""

    help: str
    unit: str | None = None
    minimum: float | None = None
    maximum: float | None = None
    key: str | None = None
    reader: str | None = None
    choices: tuple[str, ...] = ()
    shown: str | None = None
    secret: bool = False  # the value names a secret
    registry: str | None = None  # a kind: the package whose KINDS lists them
    allowed: str | None = None  # what the README says it takes, when the rest does not say


def setting(
    default: Any = MISSING,
    *,
    help: str,
    unit: str | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    key: str | None = None,
    reader: str | None = None,
    choices: tuple[str, ...] = (),
    shown: str | None = None,
    secret: bool = False,
    registry: str | None = None,
    allowed: str | None = None,
    default_factory: Any = MISSING,
) -> Any:
    """A dataclass field carrying its Spec."""
    spec = Spec(
        help, unit, minimum, maximum, key, reader, choices, shown, secret, registry, allowed
    )
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata={SPEC: spec})
    return field(default=default, metadata={SPEC: spec})


def spec_of(f: dataclasses.Field[Any]) -> Spec | None:
    spec = f.metadata.get(SPEC)
    return spec if isinstance(spec, Spec) else None


def toml_key(f: dataclasses.Field[Any]) -> str:
    spec = spec_of(f)
    return spec.key if spec is not None and spec.key else f.name


def number_text(value: float) -> str:
    """2.0 -> "2", 0.05 -> "0.05": how the README and the errors write numbers."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def range_text(spec: Spec, joiner: str = "to") -> str:
    """E.g. `0.05 to 3600 seconds`, with the days when a bound in seconds is long."""
    low = number_text(spec.minimum) if spec.minimum is not None else None
    high = number_text(spec.maximum) if spec.maximum is not None else None
    if low is None and high is None:
        return ""
    text = f"{low} {joiner} {high}" if low is not None and high is not None else f">= {low}"
    if spec.unit:
        text += f" {spec.unit}"
    if spec.unit == "seconds" and spec.maximum is not None and spec.maximum >= DAY:
        days = spec.maximum / DAY
        text += f" ({number_text(days)} day{'' if days == 1 else 's'})"
    return text


def _timeout() -> Any:
    return setting(
        10.0, minimum=0.1, maximum=300, unit="seconds", help="time allowed for one request"
    )


@dataclass(frozen=True, slots=True)
class AgentSettings:
    poll_interval: float = setting(
        2.0,
        minimum=0.05,
        maximum=3600,
        unit="seconds",
        help="between polls of each platform account",
    )
    busy_poll_interval: float = setting(
        0.25,
        minimum=0.0,
        maximum=3600,
        unit="seconds",
        help="after a poll that found new orders, poll again this soon, until one finds none"
        " (0: only every poll_interval)",
    )
    sweep_interval: float = setting(
        5.0,
        minimum=0.05,
        maximum=3600,
        unit="seconds",
        help="between sweeps (retries due, backorders with stock)",
    )
    reconcile_interval: float = setting(
        300.0,
        minimum=1,
        maximum=DAY,
        unit="seconds",
        help="between full re-listings from the first page",
    )
    concurrency: int = setting(
        16,
        minimum=1,
        maximum=512,
        unit="lines",
        help="order lines handled at once, and as many platform connections (plus 4 for"
        " intake); raise it for a distant platform or a flash sale",
    )
    language: str = setting(
        "en",
        reader="language",
        choices=LANGUAGES,
        shown="from the locale: `LANGUAGE`, `LC_ALL`, `LC_MESSAGES`, `LANG` (the first set)",
        help="the merchant's language: the CLI, alerts, the console and the Telegram bot (a"
        " Chinese locale such as `zh_CN.UTF-8` means zh-CN, any other en)",
    )
    buyer_language: str | None = setting(
        None,
        reader="optional language",
        choices=LANGUAGES,
        shown="`agent.language`",
        help="the buyers' language, when they read another than the merchant: notices to"
        " buyers and the default delivery message",
    )
    delivery_message: str | None = setting(
        None,
        reader="optional template",
        allowed="text (a template)",
        shown=f'"{DEFAULT_DELIVERY_MESSAGE}"',
        help="message sent with the keys (a SKU may have its own); the default one is sent in"
        " `buyer_language`, one written here as it is; a template: {订单号}/{order_id},"
        " {商品}/{sku}, {数量}/{quantity}, {卡号}/{code}, {卡密}/{secret} (a line holding a"
        " key's variable is repeated for each key), `{{`/`}}` for a brace",
    )
    max_delivery_attempts: int = setting(
        50,
        minimum=1,
        maximum=10_000,
        unit="attempts",
        help="then the order is parked in `needs_attention` for a human",
    )
    retry_base: float = setting(
        1.0,
        minimum=0.01,
        maximum=3600,
        unit="seconds",
        help="first wait between delivery attempts; it doubles at each attempt...",
    )
    retry_cap: float = setting(
        300.0, minimum=0.01, maximum=DAY, unit="seconds", help="...up to this"
    )
    supplier_retry_interval: float = setting(
        30.0,
        minimum=0.01,
        maximum=DAY,
        unit="seconds",
        help="a backordered line that can be bought is offered to the suppliers again this often",
    )
    balance_interval: float = setting(
        300.0,
        minimum=1,
        maximum=DAY,
        unit="seconds",
        help="between reads of the suppliers' balances",
    )
    buyer_limit: int = setting(
        0,
        minimum=0,
        maximum=1_000_000,
        unit="keys",
        help="keys one buyer (by contact) may buy, all SKUs together, within buyer_limit_window;"
        " an order beyond it is parked at intake with the reason (0: no limit)",
    )
    buyer_limit_window: float = setting(
        DAY,
        minimum=60,
        maximum=365 * DAY,
        unit="seconds",
        help="the time the buyer limits count a buyer's orders over",
    )
    blocked_buyers: tuple[str, ...] = setting(
        (),
        reader="optional strings",
        allowed="list of text",
        help="buyer contacts (any case) whose orders are parked at intake, never delivered",
    )

    @property
    def buyers_language(self) -> str:
        return self.buyer_language or self.language

    def message_with_keys(self) -> str:
        """The delivery message when the SKU has none: the merchant's, else ours in the
        buyers' language."""
        if self.delivery_message:
            return self.delivery_message
        return Translator(self.buyers_language)(DEFAULT_DELIVERY_MESSAGE)


def default_delivery_messages() -> frozenset[str]:
    """Our default delivery message in every language (an adapter with a default of its own,
    like Agiso's template, uses it in place of ours)."""
    return frozenset(Translator(language)(DEFAULT_DELIVERY_MESSAGE) for language in LANGUAGES)


@dataclass(frozen=True, slots=True)
class StoreSettings:
    """Either `path` (the embedded SQLite ledger) or `url` (PostgreSQL shared by agents)."""

    path: Path | None = setting(  # noqa: RUF009 (a field, not a call at each init)
        None,
        reader="by hand",
        shown="required (or url)",
        allowed="file path",
        help="SQLite ledger file; relative to the config file; created by `kami-agent init`,"
        " mode 0600",
    )
    key_secret: str = setting(
        "store.key",
        key="key",
        reader="secret",
        secret=True,
        help="name of the secret holding the master key that seals card keys at rest"
        " (32 bytes, base64)",
    )
    url: str | None = setting(
        None,
        reader="by hand",
        shown="required (or path)",
        allowed="postgresql:// URL",
        help="`postgresql://user@host:port/db`: the ledger shared by several agents"
        " (no password in it)",
    )
    password_secret: str | None = setting(
        None,
        key="password",
        reader="optional secret",
        secret=True,
        help="PostgreSQL: name of the secret holding the password (or use `PGPASSWORD` /"
        " `~/.pgpass`)",
    )
    instance: str | None = setting(
        None,
        reader="optional string",
        shown="host name",
        help="PostgreSQL: this agent's name among those sharing the database; give each its own",
    )
    lease_seconds: float = setting(
        60.0,
        minimum=2.0,
        maximum=3600.0,
        unit="seconds",
        help="PostgreSQL: a line stays this long with an agent that stopped answering",
    )
    pool_size: int = setting(
        10, minimum=2, maximum=100, unit="connections", help="PostgreSQL: connections per agent"
    )

    def describe(self) -> str:
        if self.url is not None:
            return self.url
        return str(self.path)


@dataclass(frozen=True, slots=True)
class LogSettings:
    level: str = setting("info", reader="choice", choices=LOG_LEVELS, help="log level")


DEFAULT_KIND = "http"  # of a platform or a supplier without `kind`


@dataclass(frozen=True, slots=True)
class PlatformSettings:
    name: str
    kind: str = setting(
        reader="by hand",
        shown=DEFAULT_KIND,
        registry="agent.platforms",
        help="the platform's protocol: `http` is docs/protocol/platform-http.md; the others"
        " are described, with their own keys, in docs/platforms/<kind>.md",
    )
    base_url: str = setting(reader="url", help="the platform API's base URL")
    api_key: str = setting(reader="string", help="key id (sent as `X-Api-Key` by `http`)")
    secret_name: str = setting(
        key="secret", reader="secret", secret=True, help="name of the signing secret"
    )
    timeout: float = _timeout()
    page_size: int = setting(
        100, minimum=1, maximum=1000, unit="orders", help="orders asked for per page"
    )
    long_poll: bool = setting(
        False,
        help="also take orders from the protocol's long-poll endpoint"
        " (GET /api/v1/orders/wait) as they come",
    )
    # What only this kind has (its module's parse_options; see agent.platforms.KINDS).
    options: object | None = None


@dataclass(frozen=True, slots=True)
class SupplierSettings:
    name: str
    kind: str = setting(
        reader="by hand",
        shown=DEFAULT_KIND,
        registry="agent.suppliers",
        help="the supplier's protocol: `http` is docs/protocol/supplier-http.md, `fulu` the"
        " 福禄 open platform",
    )
    base_url: str = setting(reader="url", help="the supplier API's base URL")
    api_key: str = setting(reader="string", help="key id (Fulu: the AppKey)")
    secret_name: str = setting(
        key="secret",
        reader="secret",
        secret=True,
        help="name of the signing secret (Fulu: the AppSecret)",
    )
    timeout: float = _timeout()
    unknown_window: float = setting(
        600.0,
        minimum=1,
        maximum=7 * DAY,
        unit="seconds",
        help="a purchase of unknown outcome is parked for a human (never bought again) after this",
    )
    query_grace: float = setting(
        10.0,
        minimum=0,
        maximum=3600,
        unit="seconds",
        help="wait after a lost answer before asking again about a purchase the supplier has"
        " not seen",
    )
    processing_poll: float = setting(
        2.0,
        minimum=0.05,
        maximum=3600,
        unit="seconds",
        help="how often to look at a purchase that is still processing",
    )
    balance_low: Decimal | None = setting(  # noqa: RUF009
        None, reader="decimal", help="alert when the supplier's balance falls below this"
    )
    # What only this kind has (its module's parse_options; see agent.suppliers.KINDS).
    options: object | None = None


@dataclass(frozen=True, slots=True)
class SkuSettings:
    sku: str
    max_quantity: int = setting(
        50,
        minimum=1,
        maximum=MAX_QUANTITY_LIMIT,
        unit="keys",
        help="larger orders are parked for a human",
    )
    message: str | None = setting(
        None,
        reader="optional template",
        allowed="text (a template)",
        help="delivery message for this SKU (a template, as `agent.delivery_message`)",
    )
    sources: tuple[str, ...] = setting(
        (LOCAL_SOURCE,),
        reader="by hand",
        allowed="list of names",
        help="where keys come from, in order: `local` stock and/or supplier names",
    )
    max_price: Decimal | None = setting(  # noqa: RUF009
        None, reader="decimal", help="the highest price per key a supplier may charge"
    )
    supplier_skus: Mapping[str, str] = setting(
        key="supplier_sku",
        reader="by hand",
        allowed="table of text",
        shown="—",
        default_factory=dict,
        help='`{ supplier = "product id" }` where a supplier names the product otherwise',
    )
    lead_time: float = setting(
        3600.0,
        minimum=0,
        maximum=30 * DAY,
        unit="seconds",
        help="low-stock alert when the forecast says stock lasts less than this",
    )
    min_stock: int = setting(
        0,
        minimum=0,
        maximum=10_000_000,
        unit="keys",
        help="...or when fewer keys than this are left",
    )
    promise: float = setting(
        600.0,
        minimum=1,
        maximum=30 * DAY,
        unit="seconds",
        help='an order not delivered within this is "stuck" and alerts',
    )
    buyer_limit: int = setting(
        0,
        minimum=0,
        maximum=1_000_000,
        unit="keys",
        help="keys of this SKU one buyer may buy within `agent.buyer_limit_window` (0: no limit)",
    )
    blocked_buyers: tuple[str, ...] = setting(
        (),
        reader="optional strings",
        allowed="list of text",
        help="buyer contacts (any case) whose orders of this SKU are parked at intake",
    )
    delay: float = setting(
        0.0,
        minimum=0,
        maximum=7 * DAY,
        unit="seconds",
        help="send the keys this long after the order is taken in (0: at once)",
    )
    refund_after: float | None = setting(
        None,
        reader="optional number",
        minimum=60,
        maximum=90 * DAY,
        unit="seconds",
        help="refund an order still waiting for stock after this long (absent: never)",
    )

    def supplier_sku(self, supplier: str) -> str:
        return self.supplier_skus.get(supplier, self.sku)


@dataclass(frozen=True, slots=True)
class AlertSettings:
    forecast_interval: float = setting(
        60.0,
        minimum=0.05,
        maximum=DAY,
        unit="seconds",
        help="between stock forecasts and alert checks",
    )
    half_life: float = setting(
        3600.0,
        minimum=1,
        maximum=30 * DAY,
        unit="seconds",
        help="the sales rate forgets old sales with this half-life",
    )
    escalate_after: float = setting(
        3600.0,
        minimum=1,
        maximum=30 * DAY,
        unit="seconds",
        help="an alert still open after this is sent again...",
    )
    max_escalations: int = setting(
        3, minimum=0, maximum=100, unit="times", help="...at most this many times"
    )
    outbox_interval: float = setting(
        5.0,
        minimum=0.05,
        maximum=3600,
        unit="seconds",
        help="between attempts to send the alert messages waiting in the outbox",
    )
    unreachable_after: float = setting(
        300.0,
        minimum=0.05,
        maximum=DAY,
        unit="seconds",
        help="a platform whose every poll fails (refused, timed out, 5xx) this long raises"
        " one alert, resolved when a poll succeeds again",
    )
    buyer_notice_after: float = setting(
        600.0,
        minimum=1,
        maximum=30 * DAY,
        unit="seconds",
        help="a buyer whose order waits for stock this long gets a notice with an ETA",
    )


@dataclass(frozen=True, slots=True)
class NotifySettings:
    """One alert channel. `options` is its kind's options dataclass (agent.notify.KINDS); a
    plain mapping of the same keys is read into it when the channel is built (tests, demo)."""

    name: str
    kind: str = setting(
        reader="by hand",
        registry="agent.notify",
        help="the channel; the keys of each kind follow",
    )
    options: Any = None

    def secret_names(self) -> list[str]:
        """The secrets the channel's options name."""
        from agent.notify import kind_module  # channel modules import this one

        options = self.options
        names: list[str] = []
        for f in dataclasses.fields(kind_module(self.kind).Options):
            spec = spec_of(f)
            if spec is None or not spec.secret:
                continue
            value = (
                options.get(f.name) if isinstance(options, Mapping) else getattr(options, f.name)
            )
            if value:
                names.append(value)
        return names


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
    # [listener] (agent.listener_settings): the inbound listener for responder platforms.
    listener: ListenerSettings | None = None

    def secret_names(self) -> list[str]:
        """Every secret the config refers to, by name."""
        names = [self.store.key_secret]
        names += self.interfaces.secret_names() if self.interfaces else []
        if self.store.password_secret:
            names.append(self.store.password_secret)
        names += [p.secret_name for p in self.platforms] + [s.secret_name for s in self.suppliers]
        for platform in self.platforms:  # a kind's own secrets (Agiso's access token)
            more = getattr(platform.options, "secret_names", None)
            names += more() if callable(more) else []
        for channel in self.notify:
            names.extend(channel.secret_names())
        return names


# --- the README's table ---------------------------------------------------------------------
# Where each type sits in the TOML file, in the order the table lists them.
SECTIONS: tuple[tuple[str, type], ...] = (
    ("agent", AgentSettings),
    ("store", StoreSettings),
    ("log", LogSettings),
    ("platforms.<name>", PlatformSettings),
    ("suppliers.<name>", SupplierSettings),
    ("skus.<SKU>", SkuSettings),
    ("alerts", AlertSettings),
    ("notify.<name>", NotifySettings),
)


def _default_text(f: dataclasses.Field[Any], spec: Spec) -> str:
    if spec.shown is not None:
        return spec.shown
    if f.default is MISSING and f.default_factory is MISSING:
        return "required"
    value = f.default
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return number_text(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(f'"{v}"' for v in value) + "]"
    return f'"{value}"'


def kinds(spec: Spec) -> tuple[str, ...]:
    """The kinds registered in `spec.registry`."""
    if spec.registry is None:
        return ()
    module = importlib.import_module(spec.registry)
    return tuple(module.KINDS)


def _allowed_text(f: dataclasses.Field[Any], spec: Spec) -> str:
    if spec.allowed is not None:
        return spec.allowed
    if spec.choices or spec.registry:
        return ", ".join(spec.choices or kinds(spec))
    if spec.secret:
        return "a secret's name"
    bounds = range_text(spec)
    if bounds:
        return bounds
    if spec.reader == "url":
        return "http(s) URL"
    if spec.reader == "decimal":
        return "amount > 0"
    if spec.reader == "strings":
        return "list of text"
    if isinstance(f.default, bool):
        return "true, false"
    if spec.reader in ("string", "optional string") or isinstance(f.default, str):
        return "text"
    return ""


def rows(prefix: str, cls: type, kind: str = "") -> Iterator[str]:
    """One table row per documented field of `cls`, its keys under `prefix` (a channel's
    keys name their `kind`)."""
    for f in dataclasses.fields(cls):
        spec = spec_of(f)
        if spec is None:
            continue
        key = f"`{prefix}.{toml_key(f)}`" + (f" ({kind})" if kind else "")
        default = _default_text(f, spec)
        yield f"| {key} | {default} | {_allowed_text(f, spec)} | {spec.help} |"


def markdown_table() -> str:
    """The README's configuration table, from the metadata above and the channels' own."""
    from agent import notify

    lines = ["| key | default | allowed | meaning |", "| --- | --- | --- | --- |"]
    for prefix, cls in SECTIONS:
        lines.extend(rows(prefix, cls))
        if cls is NotifySettings:
            for kind in notify.KINDS:
                channel = notify.kind_module(kind)
                lines.extend(rows("notify.<name>", channel.Options, kind))
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if argv != ["--markdown"]:
        print("usage: python -m agent.settings --markdown", file=sys.stderr)
        return 2
    from agent import settings  # this module, not __main__'s copy, is what channels use

    sys.stdout.write(settings.markdown_table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
