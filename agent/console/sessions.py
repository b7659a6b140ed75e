"""Console sessions (kept in memory: a restart logs everyone out), CSRF tokens and the login
throttle.

A visitor gets a session before logging in, so the login form carries a CSRF token too; a
successful login replaces the session id (no fixation). The cookie holds only the random id.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections import deque
from dataclasses import dataclass, field

MAX_ANONYMOUS = 2_000  # sessions not logged in, the oldest dropped first (a flood of visits)
MAX_AUTHENTICATED = 200
LOGIN_FAILURES_ALLOWED = 5
LOGIN_FAILURE_WINDOW = 300.0
MAX_THROTTLED_ADDRESSES = 10_000


@dataclass(slots=True)
class Session:
    id: str
    csrf: str
    created: float
    authenticated: bool = False
    language: str | None = None
    # One-shot messages for the next page: (kind "ok"|"error", text).
    flashes: list[tuple[str, str]] = field(default_factory=list)

    @property
    def fingerprint(self) -> str:
        """Names the session in the audit trail and logs without giving away its cookie."""
        return hashlib.sha256(self.id.encode()).hexdigest()[:10]

    def csrf_ok(self, token: object) -> bool:
        return isinstance(token, str) and hmac.compare_digest(token.encode(), self.csrf.encode())

    def flash(self, kind: str, text: str) -> None:
        self.flashes.append((kind, text))

    def take_flashes(self) -> list[tuple[str, str]]:
        taken, self.flashes = self.flashes, []
        return taken


class SessionStore:
    def __init__(self, lifetime: float) -> None:
        self.lifetime = lifetime
        self._sessions: dict[str, Session] = {}

    def _new_id(self) -> str:
        return secrets.token_urlsafe(32)

    def create(self, now: float) -> Session:
        self._evict(now)
        session = Session(id=self._new_id(), csrf=secrets.token_urlsafe(32), created=now)
        self._sessions[session.id] = session
        return session

    def get(self, session_id: str | None, now: float) -> Session | None:
        if not session_id:
            return None
        session = self._sessions.get(session_id)
        if session is None:
            return None
        if now - session.created > self.lifetime:
            del self._sessions[session_id]
            return None
        return session

    def log_in(self, session: Session, now: float) -> Session:
        """A fresh session (new id, new CSRF token) for a visitor who has just logged in."""
        self._sessions.pop(session.id, None)
        fresh = self.create(now)
        fresh.authenticated = True
        fresh.language = session.language
        return fresh

    def drop(self, session: Session) -> None:
        self._sessions.pop(session.id, None)

    def _evict(self, now: float) -> None:
        expired = [k for k, s in self._sessions.items() if now - s.created > self.lifetime]
        for key in expired:
            del self._sessions[key]
        for authenticated, cap in ((False, MAX_ANONYMOUS), (True, MAX_AUTHENTICATED)):
            mine = [k for k, s in self._sessions.items() if s.authenticated == authenticated]
            for key in mine[: max(0, len(mine) - cap + 1)]:  # dicts keep creation order
                del self._sessions[key]


class LoginThrottle:
    """Refuses login attempts from an address after LOGIN_FAILURES_ALLOWED failures within
    LOGIN_FAILURE_WINDOW seconds, until the oldest of them ages out."""

    def __init__(self) -> None:
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, address: str, now: float) -> deque[float]:
        failures = self._failures.get(address, deque())
        while failures and now - failures[0] > LOGIN_FAILURE_WINDOW:
            failures.popleft()
        return failures

    def blocked_for(self, address: str, now: float) -> float:
        """Seconds until `address` may try again; 0 when it may now."""
        failures = self._recent(address, now)
        if len(failures) < LOGIN_FAILURES_ALLOWED:
            return 0.0
        return LOGIN_FAILURE_WINDOW - (now - failures[0])

    def failed(self, address: str, now: float) -> None:
        if len(self._failures) >= MAX_THROTTLED_ADDRESSES and address not in self._failures:
            self._failures.pop(next(iter(self._failures)))
        failures = self._recent(address, now)
        failures.append(now)
        self._failures[address] = failures

    def succeeded(self, address: str) -> None:
        self._failures.pop(address, None)
