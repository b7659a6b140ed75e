"""Chat robots: Telegram bot, DingTalk, WeCom (企业微信) and Feishu (飞书) group robots.

Each follows its vendor's documented webhook format; DingTalk and Feishu robots may require a
signature derived from a timestamp and the robot's signing secret. What each vendor documents
(and where) is in docs/notify-channels.md. Two things all of them share:

- a robot over its rate answers 200 with an error code; that alert waits in the outbox and is
  sent again later (Transient), while every other error code means the channel is misconfigured
  (bad token, signature, keyword, IP list) and retrying will not help (Permanent);
- each takes a bounded text, so a long alert is cut to fit (ending in "…") rather than refused.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from typing import Any
from urllib.parse import quote_plus

from agent.domain import AlertMessage, Permanent, Transient
from agent.notify.base import HttpNotifier, post_json
from agent.redact import register, scrub


def dingtalk_sign(secret: str, timestamp_ms: str) -> str:
    """DingTalk: base64(HMAC-SHA256(key=secret, msg=f"{timestamp}\\n{secret}")), URL-encoded."""
    mac = hmac.new(secret.encode(), f"{timestamp_ms}\n{secret}".encode(), hashlib.sha256)
    return quote_plus(base64.b64encode(mac.digest()).decode())


def feishu_sign(secret: str, timestamp_s: str) -> str:
    """Feishu: base64(HMAC-SHA256(key=f"{timestamp}\\n{secret}", msg=b""))."""
    mac = hmac.new(f"{timestamp_s}\n{secret}".encode(), b"", hashlib.sha256)
    return base64.b64encode(mac.digest()).decode()


# The error codes each robot answers when it is sent more than its documented rate (DingTalk:
# 20 a minute, then 10 minutes' pause; WeCom: 20 a minute; Feishu: 100 a minute, 5 a second).
DINGTALK_TOO_FAST = frozenset({130101})
WECOM_TOO_FAST = frozenset({45009})
FEISHU_TOO_FAST = frozenset({11232})
# Text sizes the vendors document: Telegram 4096 characters (UTF-16 code units) after entity
# parsing; WeCom 2048 bytes of text.content; Feishu 20 KB of request body (the text is held
# to 18 KB, leaving room for the JSON around it and the signature).
TELEGRAM_MAX_UNITS = 4096
WECOM_MAX_BYTES = 2048
FEISHU_MAX_TEXT_BYTES = 18 * 1024
ELLIPSIS = "…"


def fit_bytes(text: str, limit: int) -> str:
    """`text` cut at a character boundary so its UTF-8 form is at most `limit` bytes, ending in
    "…" when cut."""
    if len(text.encode()) <= limit:
        return text
    room = limit - len(ELLIPSIS.encode())
    return text.encode()[:room].decode("utf-8", "ignore") + ELLIPSIS


def fit_utf16(text: str, limit: int) -> str:
    """`text` cut so it is at most `limit` UTF-16 code units (how Telegram counts), never
    through a surrogate pair, ending in "…" when cut."""
    if len(text.encode("utf-16-le")) // 2 <= limit:
        return text
    kept, used = [], 0
    for char in text:
        units = 2 if ord(char) > 0xFFFF else 1
        if used + units > limit - 1:
            break
        kept.append(char)
        used += units
    return "".join(kept) + ELLIPSIS


def _check(
    ok: bool, channel: str, reply: Any, code: Any = None, too_fast: frozenset[int] = frozenset()
) -> None:
    if ok:
        return
    if isinstance(code, int) and code in too_fast:
        # Over the robot's rate: the same request goes through once the window has passed.
        raise Transient(f"{channel} is rate-limited: {scrub(str(reply))[:200]}")
    # Any other error code: the robot is misconfigured (bad token, keyword, signature, IP
    # list); retrying the same request will not help.
    raise Permanent(f"{channel} refused the message: {scrub(str(reply))[:200]}")


def _code(reply: Any, key: str) -> Any:
    return reply.get(key) if isinstance(reply, dict) else None


class TelegramNotifier(HttpNotifier):
    def __init__(
        self, name: str, token: str, chat_id: str, api_base: str, timeout: float = 10.0
    ) -> None:
        super().__init__(name, timeout)
        register(token)  # it sits in the URL path, which error texts show
        self._url = f"{api_base.rstrip('/')}/bot{token}/sendMessage"
        self.chat_id = chat_id

    async def send(self, message: AlertMessage) -> None:
        text = fit_utf16(message.text, TELEGRAM_MAX_UNITS)
        reply = await post_json(self.session(), self._url, {"chat_id": self.chat_id, "text": text})
        _check(isinstance(reply, dict) and reply.get("ok") is True, "telegram", reply)


class DingTalkNotifier(HttpNotifier):
    def __init__(self, name: str, url: str, sign_secret: str | None, timeout: float = 10.0) -> None:
        super().__init__(name, timeout)
        register(url, sign_secret)
        self.url = url
        self.sign_secret = sign_secret

    async def send(self, message: AlertMessage) -> None:
        url = self.url
        if self.sign_secret:
            timestamp = str(int(time.time() * 1000))
            url += f"&timestamp={timestamp}&sign={dingtalk_sign(self.sign_secret, timestamp)}"
        payload = {"msgtype": "text", "text": {"content": message.text}}
        reply = await post_json(self.session(), url, payload)
        code = _code(reply, "errcode")
        _check(code == 0, "dingtalk", reply, code, DINGTALK_TOO_FAST)


class WeComNotifier(HttpNotifier):
    def __init__(self, name: str, url: str, timeout: float = 10.0) -> None:
        super().__init__(name, timeout)
        register(url)
        self.url = url

    async def send(self, message: AlertMessage) -> None:
        text = fit_bytes(message.text, WECOM_MAX_BYTES)
        payload = {"msgtype": "text", "text": {"content": text}}
        reply = await post_json(self.session(), self.url, payload)
        code = _code(reply, "errcode")
        _check(code == 0, "wecom", reply, code, WECOM_TOO_FAST)


class FeishuNotifier(HttpNotifier):
    def __init__(self, name: str, url: str, sign_secret: str | None, timeout: float = 10.0) -> None:
        super().__init__(name, timeout)
        register(url, sign_secret)
        self.url = url
        self.sign_secret = sign_secret

    async def send(self, message: AlertMessage) -> None:
        text = fit_bytes(message.text, FEISHU_MAX_TEXT_BYTES)
        payload: dict[str, Any] = {"msg_type": "text", "content": {"text": text}}
        if self.sign_secret:
            timestamp = str(int(time.time()))
            payload["timestamp"] = timestamp
            payload["sign"] = feishu_sign(self.sign_secret, timestamp)
        reply = await post_json(self.session(), self.url, payload)
        # "code" is the documented field; "StatusCode" the one older answers carried alone.
        code = _code(reply, "code")
        ok = code == 0 or (code is None and _code(reply, "StatusCode") == 0)
        _check(ok, "feishu", reply, code, FEISHU_TOO_FAST)
