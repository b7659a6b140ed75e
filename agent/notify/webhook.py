"""Generic webhook: the alert as JSON, signed with HMAC-SHA256 over `timestamp.body`."""

from __future__ import annotations

import hashlib
import hmac
import time

from agent.domain import AlertMessage
from agent.notify.base import HttpNotifier, post_json
from agent.redact import register, register_url_tokens

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
