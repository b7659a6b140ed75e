"""Secrets are named in config and resolved at start: systemd credentials, environment, the
credential store (agent/credstore.py: sealed files, for servers without a desktop keyring),
then the keyring.

The value never goes into config files, logs or error messages — only its name does. Where a
secret is, and why one is missing, are phrased (agent/phrased.py): English in str() and the
logs, the merchant's language where the CLI shows them.
"""

from __future__ import annotations

import os
import re

import keyring
import keyring.errors
from jaraco.classes import properties
from keyring.backend import KeyringBackend

from agent.credstore import CredStore, CredStoreError
from agent.domain import AgentError
from agent.i18n import N_
from agent.phrased import Phrase, phrased

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


class CredStoreKeyring(KeyringBackend):
    """The credential store as a keyring backend (PYTHON_KEYRING_BACKEND=
    agent.secrets.CredStoreKeyring): never chosen on its own; `secrets set` and `keys init`
    fall back to it where no desktop keyring works."""

    @properties.classproperty
    def priority(cls) -> float:
        return -1.0

    def get_password(self, service: str, username: str) -> str | None:
        if service != KEYRING_SERVICE:
            return None
        return CredStore().get(username)

    def set_password(self, service: str, username: str, password: str) -> None:
        if service != KEYRING_SERVICE:
            raise keyring.errors.PasswordSetError("only kami-agent secrets live here")
        CredStore().set(username, password)

    def delete_password(self, service: str, username: str) -> None:
        if service != KEYRING_SERVICE or not CredStore().delete(username):
            raise keyring.errors.PasswordDeleteError("no such secret")


_CREDENTIALS: KeyringBackend = SystemdCredentialsKeyring()  # type: ignore[no-untyped-call]


def _from_credstore(name: str) -> str | None:
    try:
        return CredStore().get(name)
    except CredStoreError:
        return None  # resolve_secret says why


def lookup_secret(name: str) -> str | None:
    """systemd credentials, then the environment (containers, CI), then the credential store,
    then the keyring."""
    value = _CREDENTIALS.get_password(KEYRING_SERVICE, name)
    value = value or os.environ.get(env_var_for(name)) or _from_credstore(name)
    if value:
        return value
    try:
        return keyring.get_password(KEYRING_SERVICE, name)
    except Exception:  # a keyring backend may fail any way (D-Bus, no session)
        # No usable keyring backend on this box: same as "not stored there".
        return None


def _backend() -> dict[str, str]:
    return {"backend": type(keyring.get_keyring()).__name__}


def where_stored(name: str) -> Phrase | None:
    """Where lookup_secret finds `name` (never its value), in words, or None."""
    if _CREDENTIALS.get_password(KEYRING_SERVICE, name):
        return Phrase(N_("systemd credential ($CREDENTIALS_DIRECTORY)"))
    if os.environ.get(env_var_for(name)):
        return Phrase(N_("environment (%(variable)s)"), {"variable": env_var_for(name)})
    if _from_credstore(name):
        return CredStore().describe(name)
    try:
        if keyring.get_password(KEYRING_SERVICE, name):
            return Phrase(N_("keyring (%(backend)s)"), _backend())
    except Exception:  # see lookup_secret
        return None
    return None


def resolve_secret(name: str) -> str:
    value = lookup_secret(name)
    if not value:
        CredStore().get(name)  # a sealed file that does not open: raises with the reason
        raise phrased(
            SecretMissing,
            N_(
                "secret %(name)r is not set: store it with `kami-agent secrets set %(secret)s` or"
                " provide environment variable %(variable)s"
            ),
            name=name,
            secret=name,
            variable=env_var_for(name),
        )
    return value


def _keyring_works() -> bool:
    """A keyring that can store: not the fail backend, not a read-only one."""
    try:
        backend = keyring.get_keyring()
    except Exception:  # see lookup_secret
        return False
    name = type(backend).__module__ + "." + type(backend).__name__
    if "fail" in name or isinstance(backend, SystemdCredentialsKeyring | CredStoreKeyring):
        return False
    backends = getattr(backend, "backends", None)
    return backends is None or bool(backends)


def store_secret(name: str, value: str, backend: str | None = None) -> Phrase:
    """Stores the secret; returns where, in words. `backend`: "keyring", "credstore", or None
    (the keyring when one works, else the credential store)."""
    if backend == "credstore" or (backend is None and not _keyring_works()):
        return CredStore().set(name, value)
    try:
        keyring.set_password(KEYRING_SERVICE, name, value)
    except Exception as exc:  # see lookup_secret
        if backend == "keyring":
            raise phrased(
                SecretMissing,
                N_(
                    "cannot store secret %(name)r: no writable keyring (%(error)s); store it"
                    " with --store credstore, or use environment variable %(variable)s"
                ),
                name=name,
                error=type(exc).__name__,
                variable=env_var_for(name),
            ) from None
        # A desktop keyring that is installed but has no session (a server): the store.
        return CredStore().set(name, value)
    return Phrase(N_("in the keyring (%(backend)s)"), _backend())


# Where delete_secret found a secret: (in the credential store, in the keyring) -> the words.
_DELETED_FROM = {
    (True, False): N_("the credential store"),
    (False, True): N_("the keyring"),
    (True, True): N_("the credential store and the keyring"),
}


def delete_secret(name: str) -> Phrase:
    """Deletes the secret wherever it is stored (credential store and keyring); returns where,
    in words."""
    in_credstore = CredStore().delete(name)
    try:
        keyring.delete_password(KEYRING_SERVICE, name)
        in_keyring = True
    except Exception:  # not there, or no keyring at all
        in_keyring = False
    if not (in_credstore or in_keyring):
        raise phrased(
            SecretMissing,
            N_("secret %(name)r is neither in the credential store nor the keyring"),
            name=name,
        )
    return Phrase(_DELETED_FROM[in_credstore, in_keyring])
