"""Secrets kept out of logs, error texts and the ledger: a secret is shown as its fingerprint.

Every outbound client registers the secrets it holds (tokens, secret webhook URLs, signing
secrets) when it is built; `scrub` replaces any of them, wherever it sits in a text, with
`[secret sha256:1a2b3c4d]`, and `safe_url` writes a URL the way an error or a log may show it.
Chat robots keep their tokens in the URL path (Telegram's /bot<TOKEN>/, Feishu's hook id) or
in the query (DingTalk's access_token, WeCom's key), and the HTTP stack puts whole URLs into
its exception texts, so the error paths run everything through here.
"""

from __future__ import annotations

import hashlib
import re
from urllib.parse import quote, quote_plus

from yarl import URL

# Shorter values would scrub ordinary words out of every message; no real token is that short.
MIN_SECRET_LENGTH = 6
# A path segment of a secret URL at least this long is taken for a token (a Feishu hook id, a
# WeCom key in the path); the shorter ones are the vendor's route words (robot, send, hook).
_URL_TOKEN_SEGMENT = 16
_MAX_URL_TEXT = 300
# Characters RFC 3986 leaves unescaped in a path segment: how a URL library may write a token.
_PATH_SAFE = ":@!$&'()*+,;=-._~"

_known: dict[str, str] = {}  # each written form of a secret -> its mask
_pattern: re.Pattern[str] | None = None


def fingerprint(value: str) -> str:
    """Tells two secrets apart in a log without revealing either (32 bits of SHA-256: far too
    few to recover a token from, enough to see which one a message is about)."""
    return "sha256:" + hashlib.sha256(value.encode()).hexdigest()[:8]


def mask(value: str) -> str:
    return f"[secret {fingerprint(value)}]"


def _forms(value: str) -> set[str]:
    """The ways a secret may be written out: as is, and percent-encoded as a URL would."""
    return {value, quote(value, safe=""), quote(value, safe=_PATH_SAFE), quote_plus(value)}


def _url_parts(value: str) -> list[str]:
    """The token-like parts of a secret that is itself a URL (a robot's webhook address)."""
    if "://" not in value:
        return []
    try:
        url = URL(value)
    except ValueError:
        return []
    parts = [v for v in url.query.values() if v]
    parts += [s for s in url.path.split("/") if len(s) >= _URL_TOKEN_SEGMENT]
    return parts


def register(*values: str | None) -> None:
    """Remembers secrets this process holds, so `scrub` can hide them anywhere. A secret that
    is a URL is hidden whole, and so is each token-like part of it."""
    _remember([part for value in values if value for part in (value, *_url_parts(value))])


def register_url_tokens(url: str) -> None:
    """For a URL that is config, not a secret, but may carry a token (a webhook address):
    its query values and long path segments are hidden, the rest stays readable."""
    _remember(_url_parts(url))


def _remember(secrets: list[str]) -> None:
    global _pattern
    added = False
    for secret in secrets:
        for form in _forms(secret):
            if len(form) >= MIN_SECRET_LENGTH and form not in _known:
                _known[form] = mask(secret)
                added = True
    if added:
        # Longest first: a URL secret is replaced whole rather than around its token.
        forms = sorted(_known, key=len, reverse=True)
        _pattern = re.compile("|".join(re.escape(form) for form in forms))


def scrub(text: str) -> str:
    """`text` with every registered secret replaced by its mask."""
    if _pattern is None:
        return text
    return _pattern.sub(lambda match: _known[match.group(0)], text)


def safe_url(url: str | URL) -> str:
    """A URL as errors and logs may show it: scheme, host, port and path with registered
    secrets masked; no user info; no query value (robots keep their tokens there): a
    registered one shows its fingerprint, any other is hidden; no fragment. Percent-encoded,
    so a hostile Location header cannot smuggle terminal escapes."""
    try:
        parsed = url if isinstance(url, URL) else URL(url)
        query = list(parsed.query.items())
        text = scrub(parsed.raw_path)  # the path alone: a whole secret URL is not hidden whole
        if parsed.absolute:
            port = f":{parsed.explicit_port}" if parsed.explicit_port is not None else ""
            text = f"{parsed.scheme}://{parsed.raw_host}{port}{text}"
    except (ValueError, TypeError):
        return "(an unparseable URL)"
    if query:
        text += "?" + "&".join(
            f"{quote(key, safe='')}={_known.get(value, '[hidden]')}" for key, value in query
        )
    if len(text) > _MAX_URL_TEXT:
        text = text[:_MAX_URL_TEXT] + "..."
    return text
