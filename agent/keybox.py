"""Encryption of card keys at rest: envelope encryption with AES-256-GCM.

A master key (from a secret, never stored in the ledger) wraps random data keys that live in
the ledger's `data_keys` table. Each card key row is sealed with one data key and records its
id, so `kami-agent keys rotate` can move rows to a fresh data key batch by batch. Duplicate
detection uses a keyed hash (HMAC-SHA256 with a separate wrapped hash key), so the ledger
holds nothing that can be matched against a guessed key without the master key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from agent.domain import AgentError, CardItem

NONCE_BYTES = 12
KEY_BYTES = 32
_SEP = "\x1f"


class StoreKeyError(AgentError):
    """The master key is missing, malformed, or does not open this ledger."""


def parse_master_key(value: str) -> bytes:
    """A master key is 32 random bytes, written as base64 (44 characters) or hex (64)."""
    text = value.strip()
    try:
        raw = (
            bytes.fromhex(text)
            if len(text) == 2 * KEY_BYTES
            else base64.b64decode(text, validate=True)
        )
    except (ValueError, binascii.Error):
        raise StoreKeyError("the store key is neither base64 nor hex") from None
    if len(raw) != KEY_BYTES:
        raise StoreKeyError(f"the store key must be {KEY_BYTES} bytes, got {len(raw)}")
    return raw


def new_master_key() -> str:
    return base64.b64encode(os.urandom(KEY_BYTES)).decode()


def wrap(master: bytes, key: bytes, label: bytes) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(master).encrypt(nonce, key, label)


def unwrap(master: bytes, wrapped: bytes, label: bytes) -> bytes:
    try:
        return AESGCM(master).decrypt(wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], label)
    except InvalidTag:
        raise StoreKeyError("the store key does not open this ledger (wrong key?)") from None


class KeyBox:
    """Seals and opens card keys with the ledger's data keys."""

    def __init__(self, data_keys: dict[int, bytes], current: int, hash_key: bytes) -> None:
        self._ciphers = {key_id: AESGCM(key) for key_id, key in data_keys.items()}
        self.current = current
        self._hash_key = hash_key

    def add_data_key(self, key_id: int, key: bytes) -> None:
        self._ciphers[key_id] = AESGCM(key)

    def knows(self, key_id: int) -> bool:
        return key_id in self._ciphers

    def seal(self, sku: str, item: CardItem, key_id: int | None = None) -> tuple[int, bytes]:
        """(key id, nonce + ciphertext); the SKU is bound in as associated data."""
        key_id = self.current if key_id is None else key_id
        nonce = os.urandom(NONCE_BYTES)
        plain = f"{item.code}{_SEP}{item.secret}".encode()
        return key_id, nonce + self._ciphers[key_id].encrypt(nonce, plain, sku.encode())

    def open(self, sku: str, key_id: int, sealed: bytes) -> CardItem:
        cipher = self._ciphers.get(key_id)
        if cipher is None:
            raise StoreKeyError(f"data key {key_id} is not available to open a card key")
        try:
            plain = cipher.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], sku.encode())
        except InvalidTag:
            raise StoreKeyError(
                "a card key failed its integrity check (tampered ledger?)"
            ) from None
        code, _, secret = plain.decode().partition(_SEP)
        return CardItem(code=code, secret=secret)

    def digest(self, item: CardItem) -> bytes:
        """Keyed identity for duplicate detection and log fingerprints."""
        message = f"{item.code}{_SEP}{item.secret}".encode()
        return hmac.new(self._hash_key, message, hashlib.sha256).digest()

    def fingerprint(self, item: CardItem) -> str:
        return self.digest(item).hex()[:10]
