"""Builds notifier channels from config, resolving their secrets by name."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from agent.config import NotifySettings
from agent.notify import kind_module
from agent.notify.base import Notifier
from agent.secrets import resolve_secret


def build_notifier(
    settings: NotifySettings,
    secret: Callable[[str], str] = resolve_secret,
    timeout: float | None = None,
) -> Notifier:
    """`timeout`: seconds per send, when not the channel's default (10 s, email 15 s)."""
    channel = kind_module(settings.kind)
    options = settings.options
    if isinstance(options, Mapping):  # given in code (tests, the demo), not read from a file
        options = channel.Options(**options)
    return channel.build(settings.name, options, secret, timeout)
