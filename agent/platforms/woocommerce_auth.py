"""How a request proves the consumer key to a WooCommerce shop.

WooCommerce (includes/class-wc-rest-authentication.php, `authenticate`) tries HTTP Basic only
when WordPress believes the request came over TLS (`is_ssl()`); otherwise, and whenever Basic
found no key, it checks OAuth 1.0a "one-legged" parameters in the query string
[docs `_authentication.md`, "Authentication over HTTP"]. A shop reached over plain HTTP (only
allowed on loopback: a shop on the same machine) therefore ignores a Basic header: the request
must carry an OAuth signature. The signature never reveals the secret.

The signature, as `check_oauth_signature` recomputes it: the upper-case method, the URL without
its query, and every query parameter (ours and the `oauth_*` ones, not the signature), each key
and value percent-encoded as PHP's rawurlencode does (RFC 3986), sorted by key, joined `k=v`
with `&`; the three parts percent-encoded and joined with `&`; HMAC-SHA256 keyed with the
consumer secret followed by `&`, base64. The timestamp must be within 15 minutes of the shop's
clock and the nonce unused by this key for 15 minutes (`check_oauth_timestamp_and_nonce`).
The JSON body is not signed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Mapping
from urllib.parse import quote


def rfc3986(text: str) -> str:
    """Percent-encoding as PHP's rawurlencode (what WooCommerce signs with): only letters,
    digits and `-._~` stay as they are."""
    return quote(text, safe="~")


def query_string(params: Mapping[str, str]) -> str:
    """The query as sent, encoded exactly as it is signed."""
    return "&".join(f"{rfc3986(k)}={rfc3986(v)}" for k, v in params.items())


def oauth_params(
    method: str,
    url: str,
    params: Mapping[str, str],
    consumer_key: str,
    consumer_secret: str,
    *,
    now: float | None = None,
    nonce: str | None = None,
) -> dict[str, str]:
    """The `oauth_*` parameters (with the signature) to add to the query of a request to `url`
    (scheme, host, path; no query) that already has the query `params`."""
    oauth = {
        "oauth_consumer_key": consumer_key,
        "oauth_nonce": nonce or secrets.token_hex(16),  # 32 characters, as the docs advise
        "oauth_signature_method": "HMAC-SHA256",
        "oauth_timestamp": str(int(time.time() if now is None else now)),
    }
    pairs = sorted((rfc3986(k), rfc3986(v)) for k, v in {**params, **oauth}.items())
    parameter_string = "&".join(f"{k}={v}" for k, v in pairs)
    base = "&".join((method.upper(), rfc3986(url), rfc3986(parameter_string)))
    digest = hmac.new(f"{consumer_secret}&".encode(), base.encode(), hashlib.sha256).digest()
    return {**oauth, "oauth_signature": base64.b64encode(digest).decode()}
