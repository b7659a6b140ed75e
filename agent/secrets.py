"""Secrets are named in config and resolved at start: systemd credentials, environment, keyring.

The value never goes into config files, logs or error messages — only its name does.
"""

from __future__ import annotations

import os
import re

import keyring
import keyring.errors
from jaraco.classes import properties
from keyring.backend import KeyringBackend

from agent.domain import AgentError

KEYRING_SERVICE = "kami-agent"


class SecretMissing(AgentError):
    pass


def env_var_for(name: str) -> str:
    """`platform.main.secret` -> `KAMI_SECRET_PLATFORM_MAIN_SECRET` (for containers, CI)."""
    return "KAMI_SECRET_" + re.sub(r"[^A-Za-z0-9]", "_", name).upper()


class SystemdCredentialsKeyring(KeyringBackend):
    """Read-only keyring over systemd credentials ($CREDENTIALS_DIRECTORY/<name>).

    The unit selects it with PYTHON_KEYRING_BACKEND=agent.secrets.SystemdCredentialsKeyring;
    LoadCredentialEncrypted= decrypts each secret into that directory, readable by the
    service alone, for as long as it runs.
    """

    @properties.classproperty
    def priority(cls) -> float:
        return 9.0 if os.environ.get("CREDENTIALS_DIRECTORY") else -1.0

    def get_password(self, service: str, username: str) -> str | None:
        directory = os.environ.get("CREDENTIALS_DIRECTORY")
        if service != KEYRING_SERVICE or not directory:
            return None
        if "/" in username or username.startswith("."):
            return None
        try:
            with open(os.path.join(directory, username), encoding="utf-8") as handle:
                return handle.read().strip() or None
        except OSError:
            return None

    def set_password(self, service: str, username: str, password: str) -> None:
        raise keyring.errors.PasswordSetError("systemd credentials are read-only")

    def delete_password(self, service: str, username: str) -> None:
        raise keyring.errors.PasswordDeleteError("systemd credentials are read-only")


_CREDENTIALS: KeyringBackend = SystemdCredentialsKeyring()  # type: ignore[no-untyped-call]


def lookup_secret(name: str) -> str | None:
    """systemd credentials, then the environment (containers, CI), then the keyring."""
    value = _CREDENTIALS.get_password(KEYRING_SERVICE, name)
    value = value or os.environ.get(env_var_for(name))
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


def delete_secret(name: str) -> None:
    try:
        keyring.delete_password(KEYRING_SERVICE, name)
    except keyring.errors.PasswordDeleteError:
        raise SecretMissing(f"secret {name!r} is not in the keyring") from None
    except keyring.errors.KeyringError as exc:
        raise SecretMissing(f"cannot delete secret {name!r}: {type(exc).__name__}") from None
