"""The credential store: named secrets sealed on disk, for a server without a desktop keyring.

One file per secret in a 0700 directory (`/etc/kami-agent/credstore` for root, else
`~/.config/kami-agent/credstore`; `KAMI_CREDSTORE` names another), each file 0600:

- sealed with `systemd-creds encrypt --name=NAME` where systemd-creds can be used (as root):
  bound to this machine's credential host key (or TPM), readable only through systemd — the
  very file a unit loads with `LoadCredentialEncrypted=NAME:PATH`, so the service gets it in
  `$CREDENTIALS_DIRECTORY` and the CLI (as root) reads the same file;
- else AES-256-GCM under a store key that comes from a credential: `$CREDENTIALS_DIRECTORY/
  kami-agent.credstore-key` when a unit passes one, else `KAMI_CREDSTORE_KEY` (base64), else a
  key file `.key` (0600) made beside the secrets the first time one is stored.

`KAMI_CREDSTORE_SEAL=systemd-creds|file` forces one way of sealing new secrets.

What it says (where a secret is, why it cannot be used) is phrased (agent/phrased.py): English
in str() and the logs, the merchant's language where the CLI shows it.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import shutil
import subprocess
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from agent.domain import AgentError
from agent.i18n import N_
from agent.phrased import Phrase, phrased

MAGIC = b"kami-credstore-v1:"
KEY_FILE = ".key"
KEY_CREDENTIAL = "kami-agent.credstore-key"
SYSTEMD_CREDS = "systemd-creds"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_TIMEOUT = 30


class CredStoreError(AgentError):
    """The credential store cannot be used as asked; phrased for the merchant."""


def default_directory() -> Path:
    env = os.environ.get("KAMI_CREDSTORE")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/etc/kami-agent/credstore")
    config_home = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config_home) / "kami-agent" / "credstore"


def systemd_creds_usable() -> bool:
    """systemd-creds seals with the host key, which only root can read."""
    return shutil.which(SYSTEMD_CREDS) is not None and os.geteuid() == 0


def check_name(name: str) -> None:
    if not _NAME.match(name):
        raise phrased(
            CredStoreError,
            N_(
                "a secret name is letters, digits, '.', '_' or '-' (at most 128), like"
                " platform.main.secret"
            ),
        )


class CredStore:
    def __init__(self, directory: Path | None = None, seal: str | None = None) -> None:
        self.directory = directory or default_directory()
        wanted = seal or os.environ.get("KAMI_CREDSTORE_SEAL") or None
        if wanted not in (None, "systemd-creds", "file"):
            raise phrased(CredStoreError, N_("KAMI_CREDSTORE_SEAL must be systemd-creds or file"))
        self.seal = wanted or ("systemd-creds" if systemd_creds_usable() else "file")

    def path(self, name: str) -> Path:
        check_name(name)
        return self.directory / name

    # --- reading ------------------------------------------------------------------------
    def get(self, name: str) -> str | None:
        try:
            path = self.path(name)
        except CredStoreError:
            return None
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _cannot_read(path, exc) from None
        if blob.startswith(MAGIC):
            return self._open_file(name, blob[len(MAGIC) :]).strip() or None
        return self._decrypt_systemd(name, path).strip() or None

    def describe(self, name: str) -> Phrase:
        """Where and how `name` is sealed, in words (str() is the English)."""
        path = self.path(name)
        try:
            head = path.read_bytes()[: len(MAGIC)]
        except OSError:
            head = b""
        if head == MAGIC:
            return Phrase(N_("sealed in %(path)s (encrypted file)"), {"path": str(path)})
        return Phrase(N_("sealed in %(path)s (systemd-creds)"), {"path": str(path)})

    # --- writing ------------------------------------------------------------------------
    def set(self, name: str, value: str) -> Phrase:
        path = self.path(name)
        self._make_directory()
        tmp = path.with_name(f".{name}.tmp")
        tmp.unlink(missing_ok=True)
        if self.seal == "systemd-creds":
            self._encrypt_systemd(name, value, tmp)
        else:
            nonce = os.urandom(12)
            sealed = nonce + AESGCM(self._file_key(create=True)).encrypt(
                nonce, value.encode(), name.encode()
            )
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(MAGIC + base64.b64encode(sealed) + b"\n")
                handle.flush()
                os.fsync(handle.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
        return self.describe(name)

    def delete(self, name: str) -> bool:
        try:
            self.path(name).unlink()
        except FileNotFoundError:
            return False
        return True

    def _make_directory(self) -> None:
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.directory, 0o700)
        except OSError as exc:
            raise phrased(
                CredStoreError,
                N_("cannot create %(path)s: %(why)s"),
                path=str(self.directory),
                why=_why(exc),
            ) from None

    # --- systemd-creds ------------------------------------------------------------------
    def _encrypt_systemd(self, name: str, value: str, target: Path) -> None:
        old = os.umask(0o077)
        try:
            result = subprocess.run(
                [SYSTEMD_CREDS, "encrypt", f"--name={name}", "-", str(target)],
                input=value.encode(),
                capture_output=True,
                timeout=_TIMEOUT,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise _failed("encrypt", str(exc)) from None
        finally:
            os.umask(old)
        if result.returncode != 0:
            raise _failed("encrypt", _last_line(result.stderr))

    def _decrypt_systemd(self, name: str, path: Path) -> str:
        if shutil.which(SYSTEMD_CREDS) is None:
            raise phrased(
                CredStoreError,
                N_("%(path)s is sealed with systemd-creds, which is not installed"),
                path=str(path),
            )
        try:
            result = subprocess.run(
                [SYSTEMD_CREDS, "decrypt", f"--name={name}", str(path), "-"],
                capture_output=True,
                timeout=_TIMEOUT,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise _failed("decrypt", str(exc)) from None
        if result.returncode != 0:
            raise phrased(
                CredStoreError,
                N_(
                    "cannot open %(path)s with systemd-creds (as root, on the machine that"
                    " sealed it): %(why)s"
                ),
                path=str(path),
                why=_last_line(result.stderr),
            )
        return result.stdout.decode("utf-8", "replace")

    # --- the file way ---------------------------------------------------------------------
    def _file_key(self, *, create: bool) -> bytes:
        credentials = os.environ.get("CREDENTIALS_DIRECTORY")
        if credentials:
            try:
                return _parse_key(Path(credentials, KEY_CREDENTIAL).read_bytes(), KEY_CREDENTIAL)
            except FileNotFoundError:
                pass
        env = os.environ.get("KAMI_CREDSTORE_KEY")
        if env:
            return _parse_key(env.encode(), "KAMI_CREDSTORE_KEY")
        key_path = self.directory / KEY_FILE
        try:
            return _parse_key(key_path.read_bytes(), str(key_path))
        except FileNotFoundError:
            if not create:
                raise phrased(
                    CredStoreError,
                    N_(
                        "the credential store's key is missing (no %(path)s, no"
                        " KAMI_CREDSTORE_KEY): the secrets sealed with it cannot be opened"
                    ),
                    path=str(key_path),
                ) from None
        except OSError as exc:
            raise _cannot_read(key_path, exc) from None
        key = os.urandom(32)
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(base64.b64encode(key) + b"\n")
        return key

    def _open_file(self, name: str, body: bytes) -> str:
        try:
            sealed = base64.b64decode(body.strip(), validate=True)
            plain = AESGCM(self._file_key(create=False)).decrypt(
                sealed[:12], sealed[12:], name.encode()
            )
        except (binascii.Error, ValueError, InvalidTag):
            raise phrased(
                CredStoreError,
                N_(
                    "%(path)s does not open with the credential store's key (altered, renamed,"
                    " or another key)"
                ),
                path=str(self.directory / name),
            ) from None
        return plain.decode("utf-8", "replace")


def _parse_key(raw: bytes, where: str) -> bytes:
    try:
        key = base64.b64decode(raw.strip(), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != 32:
        raise phrased(
            CredStoreError,
            N_("%(where)s: the credential store key must be 32 bytes in base64"),
            where=where,
        )
    return key


def _cannot_read(path: Path, exc: OSError) -> CredStoreError:
    return phrased(
        CredStoreError, N_("cannot read %(path)s: %(why)s"), path=str(path), why=_why(exc)
    )


def _failed(step: str, why: str) -> CredStoreError:
    """systemd-creds encrypt/decrypt failed (the command's own words, as it said them)."""
    return phrased(
        CredStoreError,
        N_("%(command)s failed: %(why)s"),
        command=f"{SYSTEMD_CREDS} {step}",
        why=why,
    )


def _why(exc: OSError) -> str:
    return (exc.strerror or type(exc).__name__).lower()


def _last_line(stderr: bytes) -> str:
    lines = stderr.decode("utf-8", "replace").strip().splitlines()
    return lines[-1][:200] if lines else "no reason given"
