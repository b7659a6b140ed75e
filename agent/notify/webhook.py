"""Generic webhook: the alert as JSON, signed with HMAC-SHA256 over `timestamp.body`."""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agent.domain import AlertMessage
from agent.notify.base import HttpNotifier, post_json, timeout_kwargs
from agent.redact import register, register_url_tokens
from agent.settings import setting

if TYPE_CHECKING:
    from agent.config import Section

SIGNATURE_HEADER = "X-Kami-Signature"
TIMESTAMP_HEADER = "X-Kami-Timestamp"


def webhook_signature(secret: str, timestamp: str, body: bytes) -> str:
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


class WebhookNotifier(HttpNotifier):
    def __init__(self, name: str, url: str, secret: str, timeout: float = 10.0) -> None:
        super().__init__(name, timeout)
        register(secret)
        register_url_tokens(url)  # config, not a secret, but some services take a token in it
        self.url = url
        self.secret = secret

    async def send(self, message: AlertMessage) -> None:
        body = message.to_json().encode()
        timestamp = str(int(time.time()))
        headers = {
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: webhook_signature(self.secret, timestamp, body),
        }
        await post_json(self.session(), self.url, headers=headers, body=body)


# --- the channel's settings (agent.notify.KINDS) ----------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class Options:
    url: str = setting(reader="url", help="where the alert is POSTed as JSON")
    secret: str = setting(
        reader="secret",
        secret=True,
        help="name of the secret signing it: `X-Kami-Signature: sha256=hex(HMAC-SHA256(secret,"
        ' timestamp + "." + body))`, timestamp in `X-Kami-Timestamp`',
    )


def parse_options(section: Section) -> Options:
    """The webhook keys."""
    from agent.config import read_settings

    return read_settings(section, Options)


def build(
    name: str, options: Options, secret: Callable[[str], str], timeout: float | None
) -> WebhookNotifier:
    """A signed JSON webhook."""
    return WebhookNotifier(name, options.url, secret(options.secret), **timeout_kwargs(timeout))
