"""Named crash points for the crash tests: KAMI_CRASH_AT=name[:n] SIGKILLs us on the n-th hit.

Costs one dict lookup when unset; never set in production.
"""

from __future__ import annotations

import os
import signal

_ENV = "KAMI_CRASH_AT"
_hits: dict[str, int] = {}


def _target() -> tuple[str, int] | None:
    spec = os.environ.get(_ENV)
    if not spec:
        return None
    name, _, count = spec.partition(":")
    return name, int(count) if count.isdigit() else 1


_TARGET = _target()


def crash_point(name: str) -> None:
    if _TARGET is None or _TARGET[0] != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] >= _TARGET[1]:
        os.kill(os.getpid(), signal.SIGKILL)
