"""structlog JSON logging with a last line of defence against leaking secrets."""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

# Field names that must never carry their value into a log line.
_SENSITIVE = ("secret", "password", "token", "card_key", "api_secret", "signature")


@functools.lru_cache(maxsize=4096)
def _sensitive(key: str) -> bool:
    """Field names come from a fixed set in the code: each is judged once, not per line (the
    check was half of what a log line cost)."""
    lowered = key.lower()
    return any(marker in lowered for marker in _SENSITIVE)


def _redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in event:
        if _sensitive(key):
            event[key] = "[redacted]"  # a value replaced, no key added: safe while iterating
    return event


# One encoder for every line (json.dumps with options builds a new one per call); anything
# JSON does not know is written as its repr, as structlog's own renderer does.
_ENCODER = json.JSONEncoder(ensure_ascii=False, default=repr)


def _render(event: Any, **_: Any) -> str:
    return _ENCODER.encode(event)


def configure(level: str = "info", stream: TextIO | None = None) -> None:
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=_render),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stdout),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
