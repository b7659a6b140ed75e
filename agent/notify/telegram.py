"""The Telegram channel's settings: a bot (its token, a secret) posting to one chat.

The notifier itself is agent.notify.robots.TelegramNotifier (Bot API sendMessage)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent.i18n import N_
from agent.notify.base import timeout_kwargs
from agent.notify.robots import TelegramNotifier
from agent.settings import setting

if TYPE_CHECKING:
    from agent.config import Section

API_BASE = "https://api.telegram.org"
# What sendMessage takes as chat_id: the chat's number (a person's is positive, a group's
# negative, a supergroup's or channel's starts with -100), or a public channel's @username.
_CHAT_NUMBER = re.compile(r"^-?[0-9]{1,20}$")
_CHANNEL_NAME = re.compile(r"^@[A-Za-z][A-Za-z0-9_]{3,31}$")
CHAT_ID_HELP = N_(
    "the chat's id: the number Telegram gives the chat, like 123456789 (a group's is"
    " negative, often -100...: write to the bot, then open"
    " https://api.telegram.org/botTOKEN/getUpdates to see it), or a public channel's"
    " @username; a number may be written with or without quotes"
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Options:
    token: str = setting(
        reader="secret", secret=True, help="name of the secret holding the bot token"
    )
    chat_id: str = setting(
        reader="by hand", shown="required", allowed="a number, or @username", help=CHAT_ID_HELP
    )
    api_base: str = setting(API_BASE, reader="url", help="the Bot API's address")


def chat_id(section: Section, value: Any) -> str:
    """`value` as sendMessage takes it, or one error explaining what a chat id is."""
    _ = section._
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if isinstance(value, str) and (
        _CHAT_NUMBER.match(value.strip()) or _CHANNEL_NAME.match(value.strip())
    ):
        return value.strip()
    if value is None:
        raise section.missing("chat_id", _("is required: %(help)s") % {"help": _(CHAT_ID_HELP)})
    raise section.error(
        "chat_id", _("must be %(help)s; got %(value)r") % {"help": _(CHAT_ID_HELP), "value": value}
    )


def parse_options(section: Section) -> Options:
    """The telegram keys; `chat_id = 123456789` and `chat_id = "123456789"` are the same."""
    from agent.config import read_settings

    return read_settings(section, Options, chat_id=chat_id(section, section._get("chat_id")))


def build(
    name: str, options: Options, secret: Callable[[str], str], timeout: float | None
) -> TelegramNotifier:
    """A bot posting to `chat_id`."""
    return TelegramNotifier(
        name,
        secret(options.token),
        str(options.chat_id),
        options.api_base,
        **timeout_kwargs(timeout),
    )
