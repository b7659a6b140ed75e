"""The WeCom (企业微信) group robot's settings; the notifier is agent.notify.robots'."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agent.notify.base import timeout_kwargs
from agent.notify.robots import WeComNotifier
from agent.settings import setting

if TYPE_CHECKING:
    from agent.config import Section


@dataclass(frozen=True, slots=True, kw_only=True)
class Options:
    url_secret: str = setting(
        reader="secret",
        secret=True,
        help="name of the secret holding the robot's webhook URL (it carries the key)",
    )


def parse_options(section: Section) -> Options:
    """The wecom keys."""
    from agent.config import read_settings

    return read_settings(section, Options)


def build(
    name: str, options: Options, secret: Callable[[str], str], timeout: float | None
) -> WeComNotifier:
    """A group robot."""
    return WeComNotifier(name, secret(options.url_secret), **timeout_kwargs(timeout))
