"""Secrets stay out of logs and the ledger, wherever they sit in a URL (issue 13, item 6).

A Telegram bot token sits in the URL path (/bot<TOKEN>/sendMessage), a Feishu hook token at
the end of the hook URL, DingTalk's and WeCom's in the query; the HTTP stack quotes URLs in its
errors, and the other side may quote them back. Every channel kind is configured with
distinctive secrets and made to fail in every way we can provoke on loopback; the real
OutboxDrainer records the failures in a real SQLite ledger; then every log line and every byte
of the ledger (and its WAL) is searched for every secret.

Also: `check` must not echo a secret pasted where a secret's NAME belongs.
"""

from __future__ import annotations

import asyncio
import io
import logging
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TextIO
from urllib.parse import quote, quote_plus

import pytest
from aiohttp import web

from agent import logs
from agent.alerts import OutboxDrainer
from agent.config import NotifySettings
from agent.domain import AlertCondition
from agent.notify.base import Notifier
from agent.notify.factory import build_notifier
from agent.redact import fingerprint
from agent.store.base import Store
from tests.helpers import ledger_bytes
from tests.unit.test_cli import cli

TG_TOKEN = "7777777777:AAH-tg-token-SECRET-Xy0123456789abcdef"
DING_TOKEN = "dingSECRETaccesstoken0123456789abcdef0123456789"
WECOM_KEY = "wecomSECRETkey-0123-4567-89ab-cdef01234567"
FEISHU_HOOK = "feishuSECREThook-0123-4567-89ab-cdef01234567"
SIGNING = {
    "hook.secret": "webhook-hmac-SECRET-0123456789abcdef",
    "ding.sign": "SECding-sign-SECRET-0123456789abcdef",
    "fs.sign": "feishu-sign-SECRET-0123456789abcdef",
    "mail.password": "smtp-password-SECRET-0123456789abcdef",
}
TOKENS = (TG_TOKEN, DING_TOKEN, WECOM_KEY, FEISHU_HOOK)


def secrets_for(base: str) -> dict[str, str]:
    return {
        **SIGNING,
        "tg.token": TG_TOKEN,
        "ding.url": f"{base}/robot/send?access_token={DING_TOKEN}",
        "wecom.url": f"{base}/cgi-bin/webhook/send?key={WECOM_KEY}",
        "fs.url": f"{base}/open-apis/bot/v2/hook/{FEISHU_HOOK}",
    }


def channels(base: str, smtp_port: int) -> list[NotifySettings]:
    mail = {
        "host": "127.0.0.1",
        "port": smtp_port,
        "sender": "kami@example.test",
        "to": ("owner@example.test",),
        "starttls": True,
        "username": "kami",
        "password": "mail.password",
    }
    return [
        NotifySettings("mail", "email", mail),
        NotifySettings("hook", "webhook", {"url": f"{base}/hook", "secret": "hook.secret"}),
        NotifySettings("tg", "telegram", {"token": "tg.token", "chat_id": "42", "api_base": base}),
        NotifySettings("ding", "dingtalk", {"url_secret": "ding.url", "sign_secret": "ding.sign"}),
        NotifySettings("wecom", "wecom", {"url_secret": "wecom.url"}),
        NotifySettings("fs", "feishu", {"url_secret": "fs.url", "sign_secret": "fs.sign"}),
    ]


async def _serve(handler: web.Handler) -> tuple[web.AppRunner, int]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Faults:
    """One loopback server per way of failing. Every answer quotes the URL it was asked,
    tokens included, the way a proxy's or a vendor's error page may."""

    def __init__(self) -> None:
        self.runners: list[web.AppRunner] = []
        self.bases: dict[str, str] = {}
        self.silent_smtp: asyncio.AbstractServer | None = None
        self.silent_port = 0

    async def start(self) -> None:
        async def answer(status: int, request: web.Request) -> web.Response:
            await request.read()
            echo = str(request.url)
            return web.json_response(
                {"ok": False, "errcode": 1, "code": 1, "description": f"bad {echo}"},
                status=status,
            )

        async def slow(request: web.Request) -> web.Response:
            await asyncio.sleep(30)
            return web.json_response({})

        async def other(request: web.Request) -> web.Response:
            return web.json_response({"ok": True, "errcode": 0, "code": 0})

        other_runner, other_port = await _serve(other)
        self.runners.append(other_runner)

        async def redirect(request: web.Request) -> web.Response:
            target = f"http://127.0.0.1:{other_port}{request.path_qs}"
            return web.Response(status=307, headers={"Location": target})

        async def http500(request: web.Request) -> web.Response:
            return await answer(500, request)

        async def http403(request: web.Request) -> web.Response:
            return await answer(403, request)

        async def refused_in_reply(request: web.Request) -> web.Response:
            return await answer(200, request)  # a robot's "200, but no"

        handlers: dict[str, web.Handler] = {
            "http500": http500,
            "http403": http403,
            "refused_in_reply": refused_in_reply,
            "timeout": slow,
            "redirect": redirect,
        }
        for name, handler in handlers.items():
            runner, port = await _serve(handler)
            self.runners.append(runner)
            self.bases[name] = f"http://127.0.0.1:{port}"
        # TLS spoken to a plain HTTP server: the handshake fails.
        self.bases["tls"] = self.bases["http500"].replace("http://", "https://")
        self.bases["connection_refused"] = f"http://127.0.0.1:{closed_port()}"
        self.bases["bad_port"] = "http://127.0.0.1:99999"

        async def say_nothing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read()  # an SMTP server that never greets: the client times out
            writer.close()

        self.silent_smtp = await asyncio.start_server(say_nothing, "127.0.0.1", 0)
        self.silent_port = self.silent_smtp.sockets[0].getsockname()[1]

    def smtp_port(self, mode: str) -> int:
        return self.silent_port if mode == "timeout" else closed_port()

    async def stop(self) -> None:
        for runner in self.runners:
            await runner.cleanup()
        if self.silent_smtp is not None:
            self.silent_smtp.close()


@pytest.fixture
async def faults() -> AsyncIterator[Faults]:
    server = Faults()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def all_logs(quiet_logs: TextIO) -> Iterator[io.StringIO]:
    """Every structlog line and every stdlib log record (aiohttp, asyncio) of the test."""
    sink = io.StringIO()
    logs.configure("debug", sink)
    handler = logging.StreamHandler(sink)
    handler.setLevel(logging.DEBUG)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield sink
    root.removeHandler(handler)
    root.setLevel(old_level)
    logs.configure("debug", quiet_logs)


class Clock:
    now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def forms(value: str) -> set[str]:
    return {value, quote(value, safe=""), quote_plus(value), quote(value)}


async def test_no_secret_reaches_logs_or_ledger_whatever_fails(
    tmp_path: Path, sqlite_store: Store, faults: Faults, all_logs: io.StringIO
) -> None:
    clock = Clock()
    secret_values: set[str] = set(TOKENS)
    for mode, base in faults.bases.items():
        secrets = secrets_for(base)
        secret_values.update(secrets.values())
        notifiers: dict[str, Notifier] = {
            channel.name: build_notifier(channel, secrets.__getitem__, timeout=0.5)
            for channel in channels(base, faults.smtp_port(mode))
        }
        condition = AlertCondition(f"probe:{mode}", "probe", "warning", f"probe {mode}")
        await sqlite_store.apply_alerts([condition], list(notifiers), clock(), 3600.0, 3)
        try:
            sent = await OutboxDrainer(sqlite_store, notifiers, clock).drain()
        finally:
            for notifier in notifiers.values():
                await notifier.close()
        # Nothing got through (but to the webhook, for which any 200 is a yes), so every
        # channel wrote its failure: into the log and the ledger.
        assert sent == 0 or mode == "refused_in_reply", mode
    await sqlite_store.close()  # everything on disk (the WAL included) before it is read

    text = all_logs.getvalue()
    assert "alert_send_failed" in text and "alert_channel_broken" in text
    ledger = ledger_bytes(tmp_path)
    assert b"redirect" in ledger and b"HTTP 403" in ledger  # the failures were recorded
    assert fingerprint(TG_TOKEN) in text  # the token is named, by its fingerprint
    leaks = [
        form
        for value in secret_values
        for form in forms(value)
        if form in text or form.encode() in ledger
    ]
    assert leaks == []


async def test_log_lines_are_scrubbed_of_registered_secrets(all_logs: io.StringIO) -> None:
    # The last line of defence: an error text or a traceback that quotes a channel's URL
    # (aiohttp's own exception texts do) is scrubbed in the log line itself.
    notifier = build_notifier(
        NotifySettings("tg", "telegram", {"token": "t", "chat_id": "1", "api_base": "http://x"}),
        {"t": TG_TOKEN}.__getitem__,
    )
    await notifier.close()
    url = f"https://api.telegram.org/bot{TG_TOKEN}/sendMessage"
    log = logs.get_logger("kami.test")
    log.warning("send_failed", error=f"Connection timeout to host {url}", reason=url)
    try:
        raise RuntimeError(f"Connection timeout to host {quote(url)}")
    except RuntimeError as exc:
        log.exception("unexpected", problem=exc)
    text = all_logs.getvalue()
    assert text.count(fingerprint(TG_TOKEN)) >= 4, text
    assert not any(form in text for form in forms(TG_TOKEN)), text


@pytest.mark.parametrize(
    ("table", "key", "pasted"),
    [
        ("platforms.main", "secret", "sk_live_4eC39HqLyjWDarjtT1zdp7dc"),
        ("platforms.main", "secret", "0123456789abcdef0123456789abcdef"),
        ("notify.tg", "token", TG_TOKEN),
        ("notify.fs", "url_secret", f"https://open.feishu.cn/open-apis/bot/v2/hook/{FEISHU_HOOK}"),
        ("store", "key", "a2FtaS1hZ2VudCB0ZXN0IHN0b3JlIGtleSAzMiBieXQ="),
    ],
)
def test_check_refuses_a_secret_pasted_for_its_name_without_echoing_it(
    tmp_path: Path, table: str, key: str, pasted: str
) -> None:
    sections = {
        "store": {"path": '"kami.db"'},
        "platforms.main": {
            "base_url": '"http://127.0.0.1:9"',
            "api_key": '"test-key"',
            "secret": '"platform.main.secret"',
        },
        "notify.tg": {"kind": '"telegram"', "token": '"notify.tg.token"', "chat_id": '"1"'},
        "notify.fs": {"kind": '"feishu"', "url_secret": '"notify.fs.url"'},
    }
    sections[table][key] = f'"{pasted}"'
    config = tmp_path / "config.toml"
    config.write_text(
        "\n".join(
            f"[{name}]\n" + "\n".join(f"{k} = {v}" for k, v in values.items())
            for name, values in sections.items()
        ),
        encoding="utf-8",
    )
    result = cli(config, "check")
    assert result.returncode == 2, result.stdout + result.stderr
    output = result.stdout + result.stderr
    assert f"{table}.{key}: must be the NAME of a secret" in output
    assert "the value was not printed" in output
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in output
    assert not any(form in output for form in forms(pasted))
