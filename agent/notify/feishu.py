"""The Feishu (飞书) group robot's settings; the notifier is agent.notify.robots'."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agent.notify.base import timeout_kwargs
from agent.notify.robots import FeishuNotifier
from agent.settings import setting

if TYPE_CHECKING:
    from agent.config import Section


@dataclass(frozen=True, slots=True, kw_only=True)
class Options:
    url_secret: str = setting(
        reader="secret",
        secret=True,
        help="name of the secret holding the robot's webhook URL (it carries the token)",
    )
    sign_secret: str | None = setting(
        None,
        reader="optional secret",
        secret=True,
        help="name of the secret holding the signing secret, when the robot signs",
    )


def parse_options(section: Section) -> Options:
    """The feishu keys."""
    from agent.config import read_settings

    return read_settings(section, Options)


def build(
    name: str, options: Options, secret: Callable[[str], str], timeout: float | None
) -> FeishuNotifier:
    """A group robot, signing when it has a sign_secret."""
    sign = secret(options.sign_secret) if options.sign_secret else None
    return FeishuNotifier(name, secret(options.url_secret), sign, **timeout_kwargs(timeout))
