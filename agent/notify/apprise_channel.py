"""The apprise channel (`kind = "apprise"`): the many services we do not write by hand
(ServerChan, PushPlus, Bark, ntfy, Gotify, …) through the apprise library, an optional extra
(`pip install 'kami-agent[apprise]'`).

The apprise URLs carry the services' tokens, so they are a secret's value, never config.
apprise makes its own HTTP calls: they cannot be told to refuse redirects, and its logger
writes URLs; it is kept quiet (errors only, scrubbed of the registered URLs) and a failed
send is reported without apprise's own words.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent.domain import AlertMessage, Permanent, Transient
from agent.i18n import N_
from agent.notify.base import timeout_kwargs
from agent.redact import fingerprint, register, scrub
from agent.settings import setting

if TYPE_CHECKING:
    from agent.config import Section

INSTALL_HINT = N_("the apprise channel needs apprise: pip install 'kami-agent[apprise]'")
# What separates several apprise URLs in one secret: white space or commas.
_SEPARATORS = re.compile(r"[\s,]+")


class _Scrubbed(logging.Filter):
    """apprise's log records, rewritten with every registered secret masked."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = scrub(record.getMessage())
        record.args = None
        return True


def quiet_apprise_logger() -> None:
    """apprise logs each call with its URL at info and debug level, and so does urllib3 under
    it (requests): errors only, scrubbed. (Records of loggers below these keep their level
    from them; a filter holds only where it is set, hence the connection pool's own.)"""
    for name in ("apprise", "urllib3", "urllib3.connectionpool"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.ERROR)
        if not any(isinstance(f, _Scrubbed) for f in logger.filters):
            logger.addFilter(_Scrubbed())


def _apprise_module() -> Any:
    try:
        import apprise  # type: ignore[import-not-found,unused-ignore]
    except ImportError as exc:
        raise Permanent(INSTALL_HINT) from exc
    return apprise


def split_urls(value: str) -> list[str]:
    """The apprise URLs of a secret's value (several may be given, separated by white space
    or commas)."""
    return [url for url in _SEPARATORS.split(value) if url]


class AppriseNotifier:
    def __init__(self, name: str, urls: str, timeout: float = 10.0) -> None:
        apprise = _apprise_module()
        quiet_apprise_logger()
        self.name = name
        self.timeout = timeout
        services = split_urls(urls)
        register(urls, *services)
        self._fingerprint = fingerprint(urls)
        self._apprise = apprise.Apprise()
        for url in services:
            if not self._apprise.add(url):
                raise Permanent(
                    f"notify channel {name}: an apprise URL in its secret is not one apprise"
                    f" knows ({fingerprint(url)}): see https://github.com/caronc/apprise/wiki"
                )
        if not services:
            raise Permanent(f"notify channel {name}: its secret holds no apprise URL")

    async def send(self, message: AlertMessage) -> None:
        """Sends the alert to every apprise URL; Transient when any of them failed (apprise
        says which only in its log, kept quiet: the URLs hold tokens)."""
        try:
            sent = await asyncio.wait_for(
                self._apprise.async_notify(body=message.text, title=f"kami-agent: {message.kind}"),
                self.timeout,
            )
        except TimeoutError:
            raise Transient(
                f"apprise ({self._fingerprint}): no answer in {self.timeout:g} s"
            ) from None
        except Exception as exc:  # apprise's plugins raise anything; their texts may hold URLs
            raise Transient(f"apprise ({self._fingerprint}): {scrub(str(exc))}") from None
        if not bool(sent):
            raise Transient(f"apprise ({self._fingerprint}): a service did not take the alert")

    async def close(self) -> None:
        """Nothing held open between sends."""
        return None


# --- the channel's settings (agent.notify.KINDS) ----------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class Options:
    urls: str = setting(
        reader="secret",
        secret=True,
        help="name of the secret holding the apprise URL(s), like `schan://SENDKEY` (ServerChan),"
        " `pushplus://TOKEN`, `bark://HOST/KEY`; several separated by spaces or commas",
    )


def parse_options(section: Section) -> Options:
    """The apprise keys; an error when apprise is not installed."""
    from agent.config import read_settings

    options = read_settings(section, Options)
    try:
        _apprise_module()
    except Permanent as exc:
        # The only refusal here is apprise missing: said in the merchant's language.
        raise section.error("kind", section._(str(exc))) from None
    return options


def build(
    name: str, options: Options, secret: Callable[[str], str], timeout: float | None
) -> AppriseNotifier:
    """apprise sending to the URL(s) in the secret."""
    return AppriseNotifier(name, secret(options.urls), **timeout_kwargs(timeout))
