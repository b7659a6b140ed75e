"""TOML configuration into the settings types (agent/settings.py).

Every bad value raises one ConfigError naming the file and the key, so `kami-agent check`
and `kami-agent run` can print a single clear line instead of a traceback. Defaults, ranges
and units are read from the settings' field metadata, never written here; what only one
platform kind, supplier kind or alert channel has is parsed by its module, found through its
package's KINDS registry.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import tomllib
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

from agent.domain import AgentError
from agent.i18n import (
    ENGLISH,
    LANGUAGES,
    N_,
    Translator,
    language_from_environment,
    normalise_language,
)
from agent.secrets import env_var_for
from agent.settings import (
    DEFAULT_DELIVERY_MESSAGE,
    DEFAULT_KIND,
    LOCAL_SOURCE,
    LOG_LEVELS,
    MAX_QUANTITY_LIMIT,
    AgentSettings,
    AlertSettings,
    Config,
    LogSettings,
    NotifySettings,
    PlatformSettings,
    SkuSettings,
    Spec,
    StoreSettings,
    SupplierSettings,
    kinds,
    number_text,
    range_text,
    spec_of,
    toml_key,
)

__all__ = [
    "DEFAULT_DELIVERY_MESSAGE",
    "LOCAL_SOURCE",
    "LOG_LEVELS",
    "MAX_QUANTITY_LIMIT",
    "AgentSettings",
    "AlertSettings",
    "Config",
    "ConfigError",
    "LogSettings",
    "NotifySettings",
    "PlatformSettings",
    "Section",
    "SkuSettings",
    "StoreSettings",
    "SupplierSettings",
    "load_config",
    "parse_config",
    "read_settings",
]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# A secret's NAME: words joined by dots (platform.main.secret; a single word like `mytoken`
# too). A token, key or URL pasted in its place does not look like that (other characters,
# or a long run of letters mixed with digits), and is refused without being echoed.
_SECRET_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]+)*$")
_RANDOM_LOOKING_RUN = re.compile(r"(?=[A-Za-z0-9]*[0-9])(?=[A-Za-z0-9]*[A-Za-z])[A-Za-z0-9]{16,}")
MAX_SECRET_NAME = 64
UTF8_BOM = b"\xef\xbb\xbf"

T = TypeVar("T")


class ConfigError(AgentError):
    """A configuration problem, already phrased for the merchant."""


class Section:
    """Reads one TOML table, remembering which keys were used to reject typos. Adapters read
    their own keys through it (see agent.platforms.KINDS), and phrase their errors with its
    translator `_`: the config's [agent] language, else the locale's."""

    def __init__(
        self, source: Path, where: str, data: Any, translator: Translator | None = None
    ) -> None:
        self.source = source
        self.where = where
        self._ = translator or Translator(language_from_environment())
        if not isinstance(data, dict):
            raise self.error(None, self._("must be a table, got %(type)s") % _type(data))
        self.data: dict[str, Any] = data
        self.used: set[str] = set()

    def error(self, key: str | None, message: str) -> ConfigError:
        name = f"{self.where}.{key}" if key and self.where else (key or self.where or "(top)")
        return ConfigError(f"{self.source}: {name}: {message}")

    def missing(self, key: str, what: str = N_("is required")) -> ConfigError:
        """`key` is absent; a key set in its place that looks like a typo of it is named."""
        unknown = [k for k in self.data if k not in self.used and k != key]
        close = difflib.get_close_matches(key, unknown, n=1, cutoff=0.6)
        hint = self._(" (%(key)s is set: a typo?)") % {"key": close[0]} if close else ""
        return self.error(key, f"{self._(what)}{hint}")

    def _get(self, key: str) -> Any:
        self.used.add(key)
        return self.data.get(key)

    def string(self, key: str, default: str | None = None, *, required: bool = False) -> str:
        value = self._get(key)
        if value is None:
            if required or default is None:
                raise self.missing(key)
            return default
        if not isinstance(value, str) or not value.strip():
            raise self.error(key, self._("must be a non-empty string, got %(value)r") % _v(value))
        return value

    def secret_name(self, key: str, default: str | None = None) -> str:
        """The name of a secret (required unless `default`); never echoes what it refuses."""
        value = self._get(key)
        if value is None:
            if default is None:
                raise self.missing(key, N_("is required (the name of a secret)"))
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
            self._(
                "must be the NAME of a secret (words joined by dots, like %(example)s), not the"
                " secret itself; the value was not printed"
            )
            % {"example": example},
        )

    def optional_string(self, key: str) -> str | None:
        value = self._get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.error(key, self._("must be a string, got %(value)r") % _v(value))
        return value

    def number(
        self,
        key: str,
        default: float,
        *,
        minimum: float,
        maximum: float,
        unit: str | None = None,
    ) -> float:
        value = self._get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(key, self._("must be a number, got %(value)r") % _v(value))
        if not minimum <= value <= maximum:
            raise self._out_of_range(key, value, minimum, maximum, unit)
        return float(value)

    def integer(
        self, key: str, default: int, *, minimum: int, maximum: int, unit: str | None = None
    ) -> int:
        value = self._get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, self._("must be a whole number, got %(value)r") % _v(value))
        if not minimum <= value <= maximum:
            raise self._out_of_range(key, value, minimum, maximum, unit)
        return value

    def _out_of_range(
        self, key: str, value: float, minimum: float, maximum: float, unit: str | None
    ) -> ConfigError:
        if self._.language == ENGLISH:
            bounds = range_text(Spec("", unit, minimum, maximum), "and")
            return self.error(key, f"must be between {bounds}, got {number_text(value)}")
        # The CLI's message for a number out of range (agent/cli/common.py), units translated.
        values = {"low": number_text(minimum), "high": number_text(maximum)}
        values["text"] = number_text(value)
        if not unit:
            return self.error(
                key, self._("must be between %(low)s and %(high)s, got %(text)s") % values
            )
        # The unit inside the message: Chinese puts no space before 之间.
        return self.error(
            key,
            self._("must be between %(low)s and %(high)s %(unit)s, got %(text)s")
            % (values | {"unit": self._(unit)}),
        )

    def boolean(self, key: str, default: bool) -> bool:
        value = self._get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.error(key, self._("must be true or false, got %(value)r") % _v(value))
        return value

    def url(self, key: str, default: str | None = None) -> str:
        """An http(s) URL without its trailing slash (required unless `default`)."""
        if default is not None and self.data.get(key) is None:
            self.used.add(key)
            return default
        value = self.string(key, required=True)
        parsed = urlparse(value)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise self.error(key, self._("must be an http(s) URL, got %(value)r") % _v(value))
        return value.rstrip("/")

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        """One of `choices`, in any case."""
        value = self.string(key, default).lower()
        if value not in choices:
            raise self.error(key, self._one_of(choices, value))
        return value

    def language(self, key: str, default: str | None) -> str | None:
        """zh-CN or en (a locale name such as zh_CN.UTF-8 or en_US too); `default` when
        absent."""
        raw = self.optional_string(key)
        if raw is None:
            return default
        found = normalise_language(raw)
        if found is None:
            raise self.error(key, self._one_of(LANGUAGES, raw))
        return found

    def _one_of(self, choices: tuple[str, ...], value: str) -> str:
        return self._("must be one of %(choices)s, got %(value)r") % {
            "choices": ", ".join(choices),
            "value": value,
        }

    def strings(self, key: str) -> tuple[str, ...]:
        """A required, non-empty list of strings."""
        value = self._get(key)
        if value is None:
            raise self.missing(key)
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise self.error(
                key, self._("must be a non-empty list of strings, got %(value)r") % _v(value)
            )
        return tuple(value)

    def string_list(self, key: str) -> tuple[str, ...]:
        """A list of non-empty strings, empty when absent."""
        value = self._get(key)
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
            raise self.error(
                key, self._("must be a list of non-empty strings, got %(value)r") % _v(value)
            )
        return tuple(value)

    def decimal(self, key: str) -> Decimal | None:
        """A positive amount, or None when absent."""
        raw = self._get(key)
        if raw is None:
            return None
        try:
            value = Decimal(str(raw))
        except InvalidOperation:
            raise self.error(
                key, self._("must be a decimal amount, got %(value)r") % _v(raw)
            ) from None
        if not value.is_finite() or value <= 0:
            raise self.error(key, self._("must be a positive amount, got %(value)r") % _v(raw))
        return value

    def table(self, key: str) -> dict[str, Any]:
        value = self._get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.error(key, self._("must be a table, got %(type)s") % _type(value))
        return value

    def reject_unknown(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if not unknown:
            return
        key = unknown[0]
        close = difflib.get_close_matches(key, sorted(self.used), n=1, cutoff=0.6)
        hint = (
            self._("did you mean %(key)s?") % {"key": close[0]}
            if close
            else self._("known here: %(keys)s") % {"keys": ", ".join(sorted(self.used))}
        )
        raise self.error(key, self._("is not a known setting (%(hint)s)") % {"hint": hint})


def _v(value: Any) -> dict[str, Any]:
    return {"value": value}


def _type(value: Any) -> dict[str, str]:
    return {"type": type(value).__name__}


# --- reading a settings type through its field metadata -------------------------------------
Reader = Callable[[Section, str, Any, Spec], Any]


def _required(default: Any) -> bool:
    return default is dataclasses.MISSING


READERS: dict[str, Reader] = {
    "number": lambda s, k, d, spec: s.number(
        k, d, minimum=_bound(spec.minimum), maximum=_bound(spec.maximum), unit=spec.unit
    ),
    "integer": lambda s, k, d, spec: s.integer(
        k, d, minimum=int(_bound(spec.minimum)), maximum=int(_bound(spec.maximum)), unit=spec.unit
    ),
    "boolean": lambda s, k, d, spec: s.boolean(k, d),
    "string": lambda s, k, d, spec: s.string(k, None if _required(d) else d, required=_required(d)),
    "optional string": lambda s, k, d, spec: s.optional_string(k),
    "secret": lambda s, k, d, spec: s.secret_name(k, None if _required(d) else d),
    "optional secret": lambda s, k, d, spec: s.optional_secret_name(k),
    "url": lambda s, k, d, spec: s.url(k, None if _required(d) else d),
    "choice": lambda s, k, d, spec: s.choice(k, d, spec.choices),
    "strings": lambda s, k, d, spec: s.strings(k),
    # Absent: the locale's (LC_ALL, LANG...), read when the config is.
    "language": lambda s, k, d, spec: s.language(k, language_from_environment()),
    "optional language": lambda s, k, d, spec: s.language(k, None),
    "decimal": lambda s, k, d, spec: s.decimal(k),
    "optional number": lambda s, k, d, spec: (
        None if s._get(k) is None else READERS["number"](s, k, 0.0, spec)
    ),
    "optional strings": lambda s, k, d, spec: s.string_list(k),
    "optional template": lambda s, k, d, spec: _template(s, k, s.optional_string(k)),
}


def _template(s: Section, key: str, text: str | None) -> str | None:
    """A delivery message template, its variables checked (agent/platforms/agiso_messages.py)."""
    if text is None:
        return None
    from agent.platforms.agiso_messages import TemplateError, check_template

    try:
        check_template(text)
    except TemplateError as exc:
        raise s.error(key, exc.say(s._)) from None
    return text


def _bound(value: float | None) -> float:
    assert value is not None, "a number setting needs its minimum and maximum"
    return value


def _reader_name(spec: Spec, default: Any) -> str:
    if spec.reader is not None:
        return spec.reader
    if isinstance(default, bool):
        return "boolean"
    if isinstance(default, int):
        return "integer"
    if isinstance(default, float):
        return "number"
    return "string"


def read_values(s: Section, cls: type, **given: Any) -> dict[str, Any]:
    """The fields of the settings dataclass `cls` that have metadata, read from `s` in their
    order, each by its reader, default and range; `given` are the fields read by hand."""
    values = dict(given)
    for f in dataclasses.fields(cls):
        spec = spec_of(f)
        if f.name in given or spec is None or spec.reader == "by hand":
            continue
        default = f.default
        values[f.name] = READERS[_reader_name(spec, default)](s, toml_key(f), default, spec)
    return values


def read_settings(s: Section, cls: type[T], **given: Any) -> T:
    """An instance of the settings dataclass `cls` (see read_values)."""
    return cls(**read_values(s, cls, **given))


def field_spec(cls: type, name: str) -> Spec:
    """The metadata of field `name` of `cls`."""
    return _field(cls, name)[1]


def field_default(cls: type, name: str) -> Any:
    """The default of field `name` of `cls` (its factory's value when it has one)."""
    f = _field(cls, name)[0]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _field(cls: type, name: str) -> tuple[dataclasses.Field[Any], Spec]:
    for f in dataclasses.fields(cls):
        if f.name == name and (spec := spec_of(f)) is not None:
            return f, spec
    raise KeyError(name)


def _kind(s: Section, cls: type, what: str, default: str | None) -> str:
    known = kinds(field_spec(cls, "kind"))
    kind = s.string("kind", default, required=default is None)
    if kind not in known:
        close = difflib.get_close_matches(kind, known, n=1)
        _ = s._
        hint = _("did you mean %(kind)r? ") % {"kind": close[0]} if close else ""
        raise s.error(
            "kind",
            _("unknown %(what)s kind %(kind)r (%(hint)sknown: %(known)s)")
            % {"what": _(what), "kind": kind, "hint": hint, "known": ", ".join(known)},
        )
    return kind


# --- the file ---------------------------------------------------------------------------------
def decode_config(source: Path, raw: bytes, translator: Translator | None = None) -> str:
    """The file's text: UTF-8, with or without the BOM Windows editors write."""
    _ = translator or Translator(language_from_environment())
    if raw.startswith(UTF8_BOM):
        raw = raw[len(UTF8_BOM) :]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    # What iconv is told the file is in: Notepad's "Unicode" is UTF-16, anything else is
    # most likely the Chinese Windows ANSI code page.
    encoding = "GBK"
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        cause = _('the config file was saved as UTF-16 (Windows Notepad\'s "Unicode")')
        encoding = "UTF-16"
    else:
        try:
            raw.decode("gb18030")
            cause = _(
                "the config file was saved in a Chinese encoding (GBK/GB18030, ANSI on Chinese"
                " Windows)"
            )
        except UnicodeDecodeError:
            cause = _("the config file is not UTF-8 text")
    raise ConfigError(
        _(
            "%(file)s: %(cause)s; save it again as UTF-8 (in Notepad: Save as, Encoding: UTF-8),"
            " or convert it: iconv -f %(encoding)s -t UTF-8 %(name)s > config.utf8"
        )
        % {"file": source, "cause": cause, "name": source.name, "encoding": encoding}
    )


def load_config(path: Path | str) -> Config:
    source = Path(path)
    # Before the file is read, its language is unknown: the locale's (as the CLI's).
    _ = Translator(language_from_environment())
    try:
        raw = source.read_bytes()
    except OSError as exc:
        raise ConfigError(
            _("%(file)s: cannot read config file: %(why)s")
            % {"file": source, "why": exc.strerror or exc}
        ) from None
    try:
        data = tomllib.loads(decode_config(source, raw, _))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(
            _("%(file)s: invalid TOML: %(why)s") % {"file": source, "why": exc}
        ) from None
    return parse_config(data, source)


def config_translator(data: dict[str, Any]) -> Translator:
    """The language errors in this config are phrased in: its [agent] language when that
    names one of ours, else the locale's (as the setting's own default)."""
    agent = data.get("agent")
    value = agent.get("language") if isinstance(agent, dict) else None
    found = normalise_language(value) if isinstance(value, str) else None
    return Translator(found or language_from_environment())


def parse_config(data: dict[str, Any], source: Path) -> Config:
    tr = config_translator(data)
    top = Section(source, "", data, tr)
    agent = _parse_agent(Section(source, "agent", top.table("agent"), tr))
    store = _parse_store(Section(source, "store", top.table("store"), tr), source)
    log_section = Section(source, "log", top.table("log"), tr)
    log = read_settings(log_section, LogSettings)
    log_section.reject_unknown()

    platforms_table = top.table("platforms")
    if not platforms_table:
        raise top.error("platforms", tr("at least one [platforms.<name>] table is required"))
    platforms = tuple(
        _parse_platform(name, Section(source, f"platforms.{name}", value, tr), top)
        for name, value in platforms_table.items()
    )
    suppliers = tuple(
        _parse_supplier(name, Section(source, f"suppliers.{name}", value, tr), top)
        for name, value in top.table("suppliers").items()
    )
    supplier_names = {s.name for s in suppliers}
    skus = {
        sku: _parse_sku(sku, Section(source, f"skus.{sku}", value, tr), top, supplier_names)
        for sku, value in top.table("skus").items()
    }
    alerts = _parse_alerts(Section(source, "alerts", top.table("alerts"), tr))
    notify = tuple(
        _parse_notify(name, Section(source, f"notify.{name}", value, tr), top)
        for name, value in top.table("notify").items()
    )
    from agent.console.settings import parse_interfaces  # it reads tables through Section

    interfaces = parse_interfaces(top, agent.language)
    from agent.listener_settings import parse_listener  # it reads [listener] through Section

    listener = parse_listener(top)
    top.reject_unknown()
    config = Config(
        interfaces=interfaces,
        listener=listener,
        source=source,
        agent=agent,
        store=store,
        log=log,
        platforms=platforms,
        skus=skus,
        suppliers=suppliers,
        alerts=alerts,
        notify=notify,
    )
    _refuse_shared_env_vars(top, config)
    return config


def _refuse_shared_env_vars(top: Section, config: Config) -> None:
    """Two secret names the environment would give one variable (store.key and store-key
    both read KAMI_SECRET_STORE_KEY): whichever is set there would serve both."""
    seen: dict[str, str] = {}
    for name in config.secret_names():
        var = env_var_for(name)
        other = seen.setdefault(var, name)
        if other != name:
            raise ConfigError(
                top._(
                    "%(file)s: secret names %(a)r and %(b)r both map to the environment variable"
                    " %(var)s: one value would serve both; rename one of them (letters, digits and"
                    " one kind of separator)"
                )
                % {"file": top.source, "a": other, "b": name, "var": var}
            )


def _parse_agent(s: Section) -> AgentSettings:
    settings = read_settings(s, AgentSettings)
    s.reject_unknown()
    return settings


# The store's settings beside path, key and url: PostgreSQL's alone (password, instance,
# lease_seconds, pool_size), read from StoreSettings so a new one is refused beside a path too.
POSTGRES_ONLY = tuple(
    toml_key(f)
    for f in dataclasses.fields(StoreSettings)
    if spec_of(f) is not None and toml_key(f) not in ("path", "key", "url")
)


def _parse_store(s: Section, source: Path) -> StoreSettings:
    key_secret = s.secret_name("key", field_default(StoreSettings, "key_secret"))
    raw_path = s.optional_string("path")
    url = s.optional_string("url")
    if (raw_path is None) == (url is None):
        raise s.error(None, s._("needs exactly one of path (SQLite) or url (PostgreSQL)"))
    if url is not None:
        settings = _parse_postgres(s, url, key_secret)
        s.reject_unknown()
        return settings
    assert raw_path is not None
    for key in POSTGRES_ONLY:
        if key in s.data:
            raise s.error(
                key,
                s._("applies to a PostgreSQL ledger (store.url) only; this one is SQLite (path)"),
            )
    path = Path(raw_path).expanduser()
    if not path.is_absolute():
        # Relative to the config file, not to wherever systemd happens to start us.
        path = source.parent / path
    s.reject_unknown()
    return StoreSettings(path=path, key_secret=key_secret)


def _parse_postgres(s: Section, url: str, key_secret: str) -> StoreSettings:
    parsed = urlparse(url)
    if parsed.scheme not in ("postgresql", "postgres") or not parsed.hostname:
        raise s.error(
            "url",
            s._("must be a postgresql://user@host:port/database URL, got %(value)r") % _v(url),
        )
    if parsed.password:
        # Config files get copied around; the password lives in a secret instead.
        raise s.error(
            "url",
            s._(
                "must not contain a password; name a secret in store.password instead"
                " (kami-agent secrets set <name>)"
            ),
        )
    return read_settings(s, StoreSettings, key_secret=key_secret, url=url, path=None)


def _check_name(top: Section, table: str, name: str) -> None:
    if not _NAME_RE.match(name):
        raise top.error(f"{table}.{name}", top._("name must be letters, digits, '.', '_' or '-'"))


def _parse_platform(name: str, s: Section, top: Section) -> PlatformSettings:
    _check_name(top, "platforms", name)
    from agent.platforms import kind_module  # adapters import this module

    kind = _kind(s, PlatformSettings, N_("platform"), DEFAULT_KIND)
    shared = read_values(s, PlatformSettings, name=name, kind=kind, options=None)
    shared["options"] = kind_module(kind).parse_options(s)
    settings = PlatformSettings(**shared)
    s.reject_unknown()
    return settings


def _parse_supplier(name: str, s: Section, top: Section) -> SupplierSettings:
    if not _NAME_RE.match(name) or name == LOCAL_SOURCE:  # `local`: local stock in sources
        raise top.error(
            f"suppliers.{name}",
            top._("name must be letters, digits, '.', '_' or '-' and not 'local'"),
        )
    from agent.suppliers import kind_module  # adapters import this module

    kind = _kind(s, SupplierSettings, N_("supplier"), DEFAULT_KIND)
    shared = read_values(s, SupplierSettings, name=name, kind=kind, options=None)
    shared["options"] = kind_module(kind).parse_options(s)
    settings = SupplierSettings(**shared)
    s.reject_unknown()
    return settings


def _parse_sku(sku: str, s: Section, top: Section, suppliers: set[str]) -> SkuSettings:
    if not sku.strip() or len(sku) > 128:
        raise top.error(f"skus.{sku}", top._("SKU must be 1 to 128 characters"))
    sources = s._get("sources")
    if sources is None:
        sources = list(field_default(SkuSettings, "sources"))
    if not isinstance(sources, list) or not sources or not all(isinstance(x, str) for x in sources):
        raise s.error(
            "sources", s._("must be a non-empty list of names, got %(value)r") % _v(sources)
        )
    for name in sources:
        if name != LOCAL_SOURCE and name not in suppliers:
            raise s.error(
                "sources",
                s._("%(name)r is neither 'local' nor a [suppliers.*] name") % {"name": name},
            )
    if len(set(sources)) != len(sources):
        raise s.error("sources", s._("lists a source twice"))
    supplier_skus = s.table("supplier_sku")
    for name, value in supplier_skus.items():
        if name not in suppliers or not isinstance(value, str) or not value:
            raise s.error(
                f"supplier_sku.{name}", s._("must map a configured supplier to a product id")
            )
    settings = read_settings(
        s, SkuSettings, sku=sku, sources=tuple(sources), supplier_skus=dict(supplier_skus)
    )
    s.reject_unknown()
    return settings


def _parse_alerts(s: Section) -> AlertSettings:
    settings = read_settings(s, AlertSettings)
    s.reject_unknown()
    return settings


def _parse_notify(name: str, s: Section, top: Section) -> NotifySettings:
    _check_name(top, "notify", name)
    from agent.notify import kind_module  # channel modules import this one

    kind = _kind(s, NotifySettings, N_("channel"), None)
    options = kind_module(kind).parse_options(s)
    s.reject_unknown()
    return NotifySettings(name=name, kind=kind, options=options)
