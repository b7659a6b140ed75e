"""structlog JSON logging with a last line of defence against leaking secrets: a field named
like a secret never carries its value, and the free-text fields (errors, reasons, tracebacks)
are scrubbed of every secret the clients registered (agent/redact.py), wherever it sits in
them, e.g. inside a URL."""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

from agent.redact import scrub

# Field names that must never carry their value into a log line.
_SENSITIVE = ("secret", "password", "token", "card_key", "api_secret", "signature")
# Field names whose text may come from outside or from an exception, so may quote a URL.
_FREE_TEXT = (
    "error",
    "reason",
    "failure",
    "detail",
    "exception",
    "message",
    "summary",
    "url",
    "location",
    "problem",
)


@functools.lru_cache(maxsize=4096)
def _sensitive(key: str) -> bool:
    """Field names come from a fixed set in the code: each is judged once, not per line (the
    check was half of what a log line cost)."""
    lowered = key.lower()
    return any(marker in lowered for marker in _SENSITIVE)


@functools.lru_cache(maxsize=4096)
def _free_text(key: str) -> bool:
    """Judged once per name, like `_sensitive`: scrubbing every field of every line would
    cost a quarter of what a line costs."""
    lowered = key.lower()
    return any(marker in lowered for marker in _FREE_TEXT)


def _redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    # Values replaced, no key added: safe while iterating.
    for key, value in event.items():
        if _sensitive(key):
            event[key] = "[redacted]"
        elif _free_text(key):
            if isinstance(value, str):
                event[key] = scrub(value)
            elif isinstance(value, BaseException):  # its text may quote a URL
                event[key] = scrub(f"{type(value).__name__}: {value}")
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
            # After format_exc_info: a traceback's text is scrubbed like any error.
            structlog.processors.format_exc_info,
            _redact,
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
