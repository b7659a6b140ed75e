"""Chat robots: Telegram bot, DingTalk, WeCom (企业微信) and Feishu (飞书) group robots.

Each follows its vendor's documented webhook format; DingTalk and Feishu robots may require a
signature derived from a timestamp and the robot's signing secret.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from typing import Any
from urllib.parse import quote_plus

from agent.domain import AlertMessage, Permanent
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


def _check(ok: bool, channel: str, reply: Any) -> None:
    if not ok:
        # A robot that answers 200 with an error code is misconfigured (bad token, keyword,
        # signature): retrying the same request will not help.
        raise Permanent(f"{channel} refused the message: {scrub(str(reply))[:200]}")


class TelegramNotifier(HttpNotifier):
    def __init__(
        self, name: str, token: str, chat_id: str, api_base: str, timeout: float = 10.0
    ) -> None:
        super().__init__(name, timeout)
        register(token)  # it sits in the URL path, which error texts show
        self._url = f"{api_base.rstrip('/')}/bot{token}/sendMessage"
        self.chat_id = chat_id

    async def send(self, message: AlertMessage) -> None:
        reply = await post_json(
            self.session(), self._url, {"chat_id": self.chat_id, "text": message.text}
        )
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
        _check(isinstance(reply, dict) and reply.get("errcode") == 0, "dingtalk", reply)


class WeComNotifier(HttpNotifier):
    def __init__(self, name: str, url: str, timeout: float = 10.0) -> None:
        super().__init__(name, timeout)
        register(url)
        self.url = url

    async def send(self, message: AlertMessage) -> None:
        payload = {"msgtype": "text", "text": {"content": message.text}}
        reply = await post_json(self.session(), self.url, payload)
        _check(isinstance(reply, dict) and reply.get("errcode") == 0, "wecom", reply)


class FeishuNotifier(HttpNotifier):
    def __init__(self, name: str, url: str, sign_secret: str | None, timeout: float = 10.0) -> None:
        super().__init__(name, timeout)
        register(url, sign_secret)
        self.url = url
        self.sign_secret = sign_secret

    async def send(self, message: AlertMessage) -> None:
        payload: dict[str, Any] = {"msg_type": "text", "content": {"text": message.text}}
        if self.sign_secret:
            timestamp = str(int(time.time()))
            payload["timestamp"] = timestamp
            payload["sign"] = feishu_sign(self.sign_secret, timestamp)
        reply = await post_json(self.session(), self.url, payload)
        ok = isinstance(reply, dict) and (reply.get("code") == 0 or reply.get("StatusCode") == 0)
        _check(ok, "feishu", reply)
