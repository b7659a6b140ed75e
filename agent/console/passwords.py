"""Console password hashes: scrypt (preferred) or PBKDF2-SHA256, from the stdlib's hashlib.

Format, one line for the config file:
    scrypt$<n>$<r>$<p>$<salt, base64>$<hash, base64>
    pbkdf2_sha256$<iterations>$<salt, base64>$<hash, base64>

`python -m agent.console.passwords` asks for a password and prints its hash.
"""

from __future__ import annotations

import base64
import binascii
import getpass
import hashlib
import hmac
import os
import sys

from agent.domain import AgentError

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
PBKDF2_MIN_ITERATIONS = 100_000
# Bounds on what a hash line may ask the login to compute: a typo'd n must not make every
# login attempt allocate gigabytes.
MAX_SCRYPT_N = 2**20
MAX_PBKDF2_ITERATIONS = 10_000_000


class PasswordHashError(AgentError):
    """A password_hash value that is not one of the two formats; phrased for the merchant."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise PasswordHashError("salt and hash must be base64") from None


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """A new scrypt hash line for `password`."""
    salt = salt or os.urandom(16)
    digest = hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32
    )
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def _parse(line: str) -> tuple[str, tuple[int, ...], bytes, bytes]:
    parts = line.strip().split("$")
    try:
        if parts[0] == "scrypt" and len(parts) == 6:
            n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
            if n < 2 or n & (n - 1) or n > MAX_SCRYPT_N or not 1 <= r <= 32 or not 1 <= p <= 16:
                raise PasswordHashError("scrypt parameters out of range")
            return "scrypt", (n, r, p), _unb64(parts[4]), _unb64(parts[5])
        if parts[0] == "pbkdf2_sha256" and len(parts) == 4:
            iterations = int(parts[1])
            if not PBKDF2_MIN_ITERATIONS <= iterations <= MAX_PBKDF2_ITERATIONS:
                raise PasswordHashError(
                    f"pbkdf2_sha256 needs {PBKDF2_MIN_ITERATIONS:,} to"
                    f" {MAX_PBKDF2_ITERATIONS:,} iterations"
                )
            return "pbkdf2_sha256", (iterations,), _unb64(parts[2]), _unb64(parts[3])
    except ValueError:
        raise PasswordHashError("the numbers in the hash are not whole numbers") from None
    raise PasswordHashError(
        "must be scrypt$n$r$p$salt$hash or pbkdf2_sha256$iterations$salt$hash"
        " (make one with `python -m agent.console.passwords`)"
    )


def check_hash_format(line: str) -> None:
    """Raises PasswordHashError when `line` is not a usable hash (config time)."""
    _, _, salt, digest = _parse(line)
    if len(salt) < 8 or len(digest) < 16:
        raise PasswordHashError("salt or hash too short")


def verify_password(password: str, line: str) -> bool:
    """Constant-time check of `password` against a hash line."""
    scheme, params, salt, expected = _parse(line)
    secret = password.encode("utf-8")
    if scheme == "scrypt":
        n, r, p = params
        actual = hashlib.scrypt(
            secret, salt=salt, n=n, r=r, p=p, dklen=len(expected), maxmem=256 * 1024 * 1024
        )
    else:
        actual = hashlib.pbkdf2_hmac("sha256", secret, salt, params[0], dklen=len(expected))
    return hmac.compare_digest(actual, expected)


def main() -> int:
    password = getpass.getpass("console password: ")
    if len(password) < 10:
        print("a console password needs at least 10 characters", file=sys.stderr)
        return 1
    if getpass.getpass("again: ") != password:
        print("the two passwords differ", file=sys.stderr)
        return 1
    print(hash_password(password))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
