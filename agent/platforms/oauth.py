"""OAuth 2.0 client-credentials tokens, cached and renewed before they expire.

The token and the client secret never reach a log line or an error message: the logs carry
a short fingerprint of the token, enough to tell one token from the next.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from agent.domain import AuthFailed, BadResponse, Permanent, Transient
from agent.logs import get_logger
from agent.platforms.rest_client import Reply, RestClient
from agent.redact import fingerprint, register, safe_url

log = get_logger("kami.oauth")

# Renew this share of a token's lifetime before it ends (at least a minute, at most half of
# it): a call made just before expiry must not carry a token that dies on the way.
RENEW_SHARE = 0.1
RENEW_AT_LEAST = 60.0
# Bounds on what the token endpoint says about lifetime: a token of "0" or "10 years" is a
# broken answer, not a reason to ask for a token on every call or never again.
MIN_LIFETIME = 10.0
MAX_LIFETIME = 86_400.0
DEFAULT_LIFETIME = 300.0  # when the answer has no expires_in: be careful, renew soon


class ClientCredentials:
    def __init__(
        self,
        client: RestClient,
        token_url: str,
        client_id: str,
        client_secret: str,
        *,
        who: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._token_url = token_url
        self._client_id = client_id
        self._client_secret = client_secret
        register(client_secret)  # masked wherever an error text might carry it
        self._who = who
        self._clock = clock
        self._token: str | None = None
        self._renew_at = 0.0
        self._lock = asyncio.Lock()
        self.fetched = 0  # tokens obtained so far (tests, logs)

    def __repr__(self) -> str:  # never the secret or the token
        return f"ClientCredentials({self._who}, client {fingerprint(self._client_id)})"

    async def token(self) -> str:
        """A token valid for a while yet; one request to the token endpoint at a time."""
        if self._token is not None and self._clock() < self._renew_at:
            return self._token
        async with self._lock:
            if self._token is None or self._clock() >= self._renew_at:
                await self._fetch()
            assert self._token is not None
            return self._token

    def invalidate(self, token: str) -> None:
        """The platform refused `token` (401): the next call fetches a new one, unless another
        call already has."""
        if self._token == token:
            self._token = None

    async def _fetch(self) -> None:
        reply = await self._client.request(
            "POST",
            self._token_url,
            form={
                "grant_type": "client_credentials",
                "client_id": self._client_id,
                "client_secret": self._client_secret,
            },
        )
        self._check(reply)
        body = reply.json()
        token = body.get("access_token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token or len(token) > 8192:
            raise BadResponse(f"{self._who} token endpoint answered without an access_token")
        lifetime = body.get("expires_in")
        if isinstance(lifetime, bool) or not isinstance(lifetime, int | float):
            lifetime = DEFAULT_LIFETIME
        lifetime = min(MAX_LIFETIME, max(MIN_LIFETIME, float(lifetime)))
        renew_before = min(max(RENEW_AT_LEAST, lifetime * RENEW_SHARE), lifetime / 2)
        register(token)
        self._token = token
        self._renew_at = self._clock() + lifetime - renew_before
        self.fetched += 1
        log.info(
            "oauth_access_renewed",
            platform=self._who,
            access_fp=fingerprint(token),
            lifetime_s=lifetime,
        )

    def _check(self, reply: Reply) -> None:
        if 200 <= reply.status < 300:
            return
        if 300 <= reply.status < 400:
            raise Permanent(
                f"{self._who} token endpoint redirects to {safe_url(reply.location or '')}; "
                "redirects are never followed: set token_url to the final address"
            )
        text = reply.message()
        if reply.status in (400, 401, 403):
            raise AuthFailed(f"{self._who} refused the client id/secret: {text}")
        if reply.status == 429:
            raise Transient(f"{self._who} token endpoint rate limit: {text}", reply.retry_after)
        raise Transient(f"{self._who} token endpoint error: {text}", reply.retry_after)
