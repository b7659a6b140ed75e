"""Builds notifier channels from config, resolving their secrets by name."""

from __future__ import annotations

from collections.abc import Callable

from agent.config import NotifySettings
from agent.notify.base import Notifier
from agent.notify.console import ConsoleNotifier
from agent.notify.email import EmailNotifier
from agent.notify.robots import DingTalkNotifier, FeishuNotifier, TelegramNotifier, WeComNotifier
from agent.notify.webhook import WebhookNotifier
from agent.secrets import resolve_secret


def build_notifier(
    settings: NotifySettings,
    secret: Callable[[str], str] = resolve_secret,
    timeout: float | None = None,
) -> Notifier:
    """`timeout`: seconds per send, when not the channel's default (10 s, email 15 s)."""
    o = settings.options
    http: dict[str, float] = {} if timeout is None else {"timeout": timeout}
    name = settings.name

    def optional(key: str) -> str | None:
        return secret(o[key]) if o.get(key) else None

    if settings.kind == "email":
        return EmailNotifier(
            name,
            o["host"],
            o["port"],
            o["sender"],
            tuple(o["to"]),
            o["starttls"],
            o.get("username"),
            optional("password"),
            15.0 if timeout is None else timeout,
            tls=o.get("tls"),
        )
    if settings.kind == "webhook":
        return WebhookNotifier(name, o["url"], secret(o["secret"]), **http)
    if settings.kind == "telegram":
        return TelegramNotifier(name, secret(o["token"]), o["chat_id"], o["api_base"], **http)
    if settings.kind == "dingtalk":
        return DingTalkNotifier(name, secret(o["url_secret"]), optional("sign_secret"), **http)
    if settings.kind == "wecom":
        return WeComNotifier(name, secret(o["url_secret"]), **http)
    if settings.kind == "feishu":
        return FeishuNotifier(name, secret(o["url_secret"]), optional("sign_secret"), **http)
    if settings.kind == "console":
        return ConsoleNotifier(name)
    raise ValueError(f"unknown notifier kind {settings.kind!r}")
