"""Every reply body we parse goes through the bounded decoder: a hostile platform or alert
channel answering with deep nesting or an endless number gets a clean error, never a
RecursionError or ValueError past our error classes."""

from __future__ import annotations

import contextlib

import pytest

from agent.domain import BadResponse
from agent.platforms.rest_client import Reply
from agent.platforms.woocommerce import WooResponse

DEEP = b"[" * 100_000 + b"]" * 100_000
LONG_NUMBER = b'{"code": "x", "message": ' + b"9" * 5000 + b"}"


@pytest.mark.parametrize("body", [DEEP, LONG_NUMBER])
def test_rest_client_reply_is_bounded(body: bytes) -> None:
    reply = Reply(200, body, None)
    with contextlib.suppress(BadResponse):  # a clean refusal is fine; anything else is not
        reply.json()
    assert isinstance(reply.message(), str)


@pytest.mark.parametrize("body", [DEEP, LONG_NUMBER])
def test_woocommerce_error_text_is_bounded(body: bytes) -> None:
    assert WooResponse(500, body, None, None, None).error_text().startswith("HTTP 500")
