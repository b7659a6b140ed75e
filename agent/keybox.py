"""Encryption of card keys at rest: envelope encryption with AES-256-GCM.

A master key (from a secret, never stored in the ledger) wraps random data keys that live in
the ledger's `data_keys` table. Each card key row is sealed with one data key and records its
id, so `kami-agent keys rotate` can move rows to a fresh data key batch by batch. Duplicate
detection uses a keyed hash (HMAC-SHA256 with a separate wrapped hash key), so the ledger
holds nothing that can be matched against a guessed key without the master key.

A sealed card key is bound to its row: the associated data is the SKU and the key's keyed
hash, which its row stores and which is unique per key. A sealed value copied into another
row (of any SKU) fails to open there, so it is reported, never delivered in that row's name.
Ledgers sealed before this bound the SKU only; they are re-sealed once when opened.
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
from agent.store.base import StoreError

NONCE_BYTES = 12
KEY_BYTES = 32
_SEP = "\x1f"
# Associated data of sealed bytes starts with this, so no card key's (an SKU) can match it.
_BYTES_AD = b"\x1ebytes\x1f"


class StoreKeyError(AgentError):
    """The master key is missing, malformed, or does not open this ledger."""


class SealedKeyError(StoreKeyError, StoreError):
    """One card key does not open in its row: altered, or its sealed value moved there from
    another row. A StoreError too: the engine parks the line it belongs to with the reason,
    where it would park any line the ledger refuses to deliver."""


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
        """(key id, nonce + ciphertext); the SKU and the key's keyed hash (its row's
        secret_hash) are bound in as associated data."""
        return self._seal(self._row_ad(sku, self.digest(item)), item, key_id)

    def _seal(self, ad: bytes, item: CardItem, key_id: int | None) -> tuple[int, bytes]:
        key_id = self.current if key_id is None else key_id
        nonce = os.urandom(NONCE_BYTES)
        plain = f"{item.code}{_SEP}{item.secret}".encode()
        return key_id, nonce + self._ciphers[key_id].encrypt(nonce, plain, ad)

    def open(self, sku: str, key_id: int, sealed: bytes, secret_hash: bytes) -> CardItem:
        """The card key sealed in a row of this SKU whose keyed hash is `secret_hash`."""
        return self._open(self._row_ad(sku, bytes(secret_hash)), key_id, sealed)

    def open_sku_bound(self, sku: str, key_id: int, sealed: bytes) -> CardItem:
        """A card key sealed before rows were bound in (the SKU only): for re-sealing."""
        return self._open(sku.encode(), key_id, sealed)

    def _open(self, ad: bytes, key_id: int, sealed: bytes) -> CardItem:
        cipher = self._ciphers.get(key_id)
        if cipher is None:
            raise StoreKeyError(f"data key {key_id} is not available to open a card key")
        try:
            plain = cipher.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], ad)
        except InvalidTag:
            raise SealedKeyError(
                "a card key failed its integrity check (its sealed value was altered, or moved"
                " there from another row): not delivered"
            ) from None
        code, _, secret = plain.decode().partition(_SEP)
        return CardItem(code=code, secret=secret)

    def seal_bytes(self, label: str, data: bytes) -> tuple[int, bytes]:
        """(key id, nonce + ciphertext) of bytes that carry card keys but are not one (a
        responder's stored reply): `label` (its row's identity) is bound in, so the value
        opens in that row only."""
        nonce = os.urandom(NONCE_BYTES)
        ad = _BYTES_AD + label.encode()
        return self.current, nonce + self._ciphers[self.current].encrypt(nonce, data, ad)

    def open_bytes(self, label: str, key_id: int, sealed: bytes) -> bytes:
        """What `seal_bytes` sealed under `label`."""
        cipher = self._ciphers.get(key_id)
        if cipher is None:
            raise StoreKeyError(f"data key {key_id} is not available to open a stored reply")
        try:
            return cipher.decrypt(
                sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], _BYTES_AD + label.encode()
            )
        except InvalidTag:
            raise SealedKeyError(
                "a stored reply failed its integrity check (altered, or moved from another"
                " row): not sent"
            ) from None

    @staticmethod
    def _row_ad(sku: str, secret_hash: bytes) -> bytes:
        return sku.encode() + _SEP.encode() + secret_hash

    def digest(self, item: CardItem) -> bytes:
        """Keyed identity for duplicate detection and log fingerprints."""
        message = f"{item.code}{_SEP}{item.secret}".encode()
        return hmac.new(self._hash_key, message, hashlib.sha256).digest()

    def fingerprint(self, item: CardItem) -> str:
        return self.digest(item).hex()[:10]
