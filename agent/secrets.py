"""Secrets are named in config and resolved at start: systemd credentials, environment, keyring.

The value never goes into config files, logs or error messages — only its name does.
"""

from __future__ import annotations

import os
import re

import keyring
import keyring.errors

from agent.domain import AgentError

KEYRING_SERVICE = "kami-agent"


class SecretMissing(AgentError):
    pass


def env_var_for(name: str) -> str:
    """`platform.main.secret` -> `KAMI_SECRET_PLATFORM_MAIN_SECRET` (for containers, CI)."""
    return "KAMI_SECRET_" + re.sub(r"[^A-Za-z0-9]", "_", name).upper()


def _from_credentials(name: str) -> str | None:
    """systemd's LoadCredential(Encrypted)= puts each secret in a file named after it."""
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if not directory or "/" in name or name.startswith("."):
        return None
    try:
        with open(os.path.join(directory, name), encoding="utf-8") as handle:
            return handle.read().strip() or None
    except OSError:
        return None


def lookup_secret(name: str) -> str | None:
    """systemd credentials, then environment, then the keyring."""
    value = _from_credentials(name) or os.environ.get(env_var_for(name))
    if value:
        return value
    try:
        return keyring.get_password(KEYRING_SERVICE, name)
    except keyring.errors.KeyringError:
        # No usable keyring backend on this box: same as "not stored there".
        return None


def resolve_secret(name: str) -> str:
    value = lookup_secret(name)
    if not value:
        raise SecretMissing(
            f"secret {name!r} is not set: store it with `kami-agent secrets set {name}` "
            f"or provide environment variable {env_var_for(name)}"
        )
    return value


def store_secret(name: str, value: str) -> None:
    try:
        keyring.set_password(KEYRING_SERVICE, name, value)
    except keyring.errors.KeyringError as exc:
        raise SecretMissing(
            f"cannot store secret {name!r}: no writable keyring ({type(exc).__name__}); "
            f"use environment variable {env_var_for(name)} instead"
        ) from None
