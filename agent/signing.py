"""Request signing shared by the platform and supplier protocols (HMAC-SHA256)."""

from __future__ import annotations

import hashlib
import hmac

MAX_CLOCK_SKEW = 300


def string_to_sign(timestamp: str, method: str, path_with_query: str, body: bytes) -> bytes:
    body_hash = hashlib.sha256(body).hexdigest()
    return f"{timestamp}\n{method.upper()}\n{path_with_query}\n{body_hash}".encode()


def sign(secret: str, timestamp: str, method: str, path_with_query: str, body: bytes) -> str:
    message = string_to_sign(timestamp, method, path_with_query, body)
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def auth_headers(
    api_key: str, secret: str, now: float, method: str, path_with_query: str, body: bytes
) -> dict[str, str]:
    timestamp = str(int(now))
    return {
        "X-Api-Key": api_key,
        "X-Timestamp": timestamp,
        "X-Signature": sign(secret, timestamp, method, path_with_query, body),
    }


def verify(
    secret: str,
    timestamp: str,
    signature: str,
    method: str,
    path_with_query: str,
    body: bytes,
    now: float,
) -> str | None:
    """Returns None when the request is authentic, else the reason it is not."""
    try:
        ts = int(timestamp)
    except ValueError:
        return "bad timestamp"
    if abs(now - ts) > MAX_CLOCK_SKEW:
        return "timestamp outside the allowed window"
    expected = sign(secret, timestamp, method, path_with_query, body)
    # Constant time, so the signature cannot be guessed byte by byte from response times.
    if not hmac.compare_digest(expected.encode(), signature.encode()):
        return "bad signature"
    return None
