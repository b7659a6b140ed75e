"""Local fakes of the chat robots' webhooks, built from their vendors' documentation (see
docs/notify-channels.md for the sources), written independently of agent.notify.robots so
the notifiers are checked against them:

- DingTalk (钉钉) custom robot: POST ?access_token=..[&timestamp=<ms>&sign=<urlencoded
  base64(HMAC-SHA256(key=secret, msg=timestamp+"\\n"+secret))>], timestamp within one hour;
  {"errcode": 0, "errmsg": "ok"}; 310000 for a failed security setting (keywords, sign, IP);
  past 20 messages a minute: 130101 "send too fast, exceed 20 times per minute".
- Feishu (飞书) custom bot: "timestamp" (seconds) and "sign" = base64(HMAC-SHA256(key=
  timestamp+"\\n"+secret, msg="")) in the body, within one hour; {"code": 0, "msg":
  "success"}; 19021 for a bad signature, 19024 for a missing keyword, 9499 for a body over
  20 KB; 11232 past 100 messages a minute or 5 a second.
- WeCom (企业微信) group robot: ?key=..; {"errcode": 0, "errmsg": "ok"}; text.content at most
  2048 bytes (40058 otherwise); past 20 messages a minute: 45009.
- Telegram Bot API sendMessage: text 1-4096 characters; {"ok": true, ...}; flood control:
  HTTP 429 {"ok": false, "error_code": 429, "parameters": {"retry_after": N}}.

Each fake counts its minute window from its own clock (`now`), so a test moves time instead
of waiting.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.loopback import serve

HOUR_S = 3600


def _b64_hmac(key: bytes, msg: bytes) -> str:
    return base64.b64encode(hmac.new(key, msg, hashlib.sha256).digest()).decode()


@dataclass
class RobotFakes:
    """All four robots on one loopback server; each keeps what it accepted."""

    ding_token: str = "DINGTOKEN0123456789"
    ding_secret: str | None = None
    feishu_hook: str = "feishu-hook-0123456789abcdef"
    feishu_secret: str | None = None
    wecom_key: str = "wecom-key-0123456789abcdef"
    telegram_token: str = "123456:telegram-token-for-the-robot-fakes"
    keyword: str | None = None  # a DingTalk/Feishu keyword security setting, when set
    now: float = 1_800_000_000.0
    accepted: dict[str, list[str]] = field(
        default_factory=lambda: {"dingtalk": [], "feishu": [], "wecom": [], "telegram": []}
    )
    _sent_at: dict[str, list[float]] = field(
        default_factory=lambda: {"dingtalk": [], "feishu": [], "wecom": [], "telegram": []}
    )
    telegram_flood_until: float = 0.0
    base_url: str = ""
    _runner: web.AppRunner | None = None

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/robot/send", self._dingtalk)
        app.router.add_post("/open-apis/bot/v2/hook/{hook}", self._feishu)
        app.router.add_post("/cgi-bin/webhook/send", self._wecom)
        app.router.add_post("/bot{token}/sendMessage", self._telegram)
        self._runner, self.base_url = await serve(app)
        return self.base_url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # --- the addresses a merchant copies out of each app --------------------------------------
    @property
    def dingtalk_url(self) -> str:
        return f"{self.base_url}/robot/send?access_token={self.ding_token}"

    @property
    def feishu_url(self) -> str:
        return f"{self.base_url}/open-apis/bot/v2/hook/{self.feishu_hook}"

    @property
    def wecom_url(self) -> str:
        return f"{self.base_url}/cgi-bin/webhook/send?key={self.wecom_key}"

    # --- rate windows ---------------------------------------------------------------------------
    def _over(self, robot: str, per_minute: int, per_second: int | None = None) -> bool:
        recent = [t for t in self._sent_at[robot] if self.now - t < 60]
        self._sent_at[robot] = recent
        if len(recent) >= per_minute:
            return True
        return per_second is not None and sum(1 for t in recent if self.now - t < 1) >= per_second

    def _take(self, robot: str, text: str) -> None:
        self._sent_at[robot].append(self.now)
        self.accepted[robot].append(text)

    # --- DingTalk -------------------------------------------------------------------------------
    async def _dingtalk(self, request: web.Request) -> web.Response:
        if request.query.get("access_token") != self.ding_token:
            return web.json_response({"errcode": 300001, "errmsg": "token is not exist"})
        if self.ding_secret is not None:
            timestamp = request.query.get("timestamp", "")
            # The sign must arrive URL-encoded ("+" as %2B): aiohttp's query decodes it once,
            # and a sign sent raw comes out with spaces for its "+".
            sign = request.query.get("sign", "")
            expected = _b64_hmac(
                self.ding_secret.encode(), f"{timestamp}\n{self.ding_secret}".encode()
            )
            if not timestamp.isdigit() or abs(self.now * 1000 - int(timestamp)) > HOUR_S * 1000:
                return web.json_response({"errcode": 310000, "errmsg": "invalid timestamp"})
            if sign != expected:
                return web.json_response({"errcode": 310000, "errmsg": "sign not match"})
        body = await request.json()
        if body.get("msgtype") != "text" or not isinstance(body.get("text"), dict):
            return web.json_response({"errcode": 40035, "errmsg": "缺少参数 json"})
        content = str(body["text"].get("content", ""))
        if self.keyword is not None and self.keyword not in content:
            return web.json_response({"errcode": 310000, "errmsg": "keywords not in content"})
        if self._over("dingtalk", 20):
            return web.json_response(
                {"errcode": 130101, "errmsg": "send too fast, exceed 20 times per minute"}
            )
        self._take("dingtalk", content)
        return web.json_response({"errcode": 0, "errmsg": "ok"})

    # --- Feishu ---------------------------------------------------------------------------------
    async def _feishu(self, request: web.Request) -> web.Response:
        if request.match_info["hook"] != self.feishu_hook:
            return web.json_response({"code": 19001, "msg": "param invalid: incoming webhook"})
        raw = await request.read()
        if len(raw) > 20 * 1024:
            return web.json_response({"code": 9499, "msg": "Bad Request", "data": {}})
        body = json.loads(raw)
        if self.feishu_secret is not None:
            timestamp = str(body.get("timestamp", ""))
            key = f"{timestamp}\n{self.feishu_secret}".encode()
            if (
                not timestamp.isdigit()
                or abs(self.now - int(timestamp)) > HOUR_S
                or body.get("sign") != _b64_hmac(key, b"")
            ):
                return web.json_response(
                    {
                        "code": 19021,
                        "msg": "sign match fail or timestamp is not within one hour from"
                        " current time",
                        "data": {},
                    }
                )
        if body.get("msg_type") != "text" or not isinstance(body.get("content"), dict):
            return web.json_response({"code": 9499, "msg": "Bad Request", "data": {}})
        text = str(body["content"].get("text", ""))
        if self.keyword is not None and self.keyword not in text:
            return web.json_response({"code": 19024, "msg": "Key Words Not Found"})
        if self._over("feishu", 100, 5):
            return web.json_response({"code": 11232, "msg": "frequency limited", "data": {}})
        self._take("feishu", text)
        return web.json_response(
            {"code": 0, "msg": "success", "data": {}, "StatusCode": 0, "StatusMessage": "success"}
        )

    # --- WeCom ----------------------------------------------------------------------------------
    async def _wecom(self, request: web.Request) -> web.Response:
        if request.query.get("key") != self.wecom_key:
            return web.json_response({"errcode": 93000, "errmsg": "invalid webhook url"})
        body = await request.json()
        if body.get("msgtype") != "text" or not isinstance(body.get("text"), dict):
            return web.json_response({"errcode": 40008, "errmsg": "invalid message type"})
        content = str(body["text"].get("content", ""))
        if len(content.encode()) > 2048:
            return web.json_response(
                {"errcode": 40058, "errmsg": "text.content exceed max length 2048"}
            )
        if self._over("wecom", 20):
            return web.json_response({"errcode": 45009, "errmsg": "api freq out of limit"})
        self._take("wecom", content)
        return web.json_response({"errcode": 0, "errmsg": "ok"})

    # --- Telegram sendMessage -------------------------------------------------------------------
    async def _telegram(self, request: web.Request) -> web.Response:
        if request.match_info["token"] != self.telegram_token:
            return web.json_response(
                {"ok": False, "error_code": 401, "description": "Unauthorized"}, status=401
            )
        if self.now < self.telegram_flood_until:
            wait = int(self.telegram_flood_until - self.now) + 1
            return web.json_response(
                {
                    "ok": False,
                    "error_code": 429,
                    "description": f"Too Many Requests: retry after {wait}",
                    "parameters": {"retry_after": wait},
                },
                status=429,
            )
        payload: dict[str, Any] = await request.json()
        text = payload.get("text")
        # "1-4096 characters after entities parsing" (no parse_mode here: the text as sent),
        # counted as Telegram counts: UTF-16 code units.
        if not isinstance(text, str) or not text:
            return web.json_response(
                {
                    "ok": False,
                    "error_code": 400,
                    "description": "Bad Request: message text is empty",
                },
                status=400,
            )
        if len(text.encode("utf-16-le")) // 2 > 4096:
            return web.json_response(
                {"ok": False, "error_code": 400, "description": "Bad Request: message is too long"},
                status=400,
            )
        self._take("telegram", text)
        return web.json_response({"ok": True, "result": {"message_id": 1, "text": text}})
