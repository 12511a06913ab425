"""Challenge-response login with the cluster secret; the secret itself never crosses the wire."""

from __future__ import annotations

import hashlib
import hmac
import secrets

NONCE_BYTES = 32


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def client_proof(secret: bytes, nonce: bytes, client_nonce: bytes) -> bytes:
    return hmac.new(secret, b"pxfs-login" + nonce + client_nonce, hashlib.sha256).digest()


def server_proof(secret: bytes, nonce: bytes, client_nonce: bytes) -> bytes:
    return hmac.new(secret, b"pxfs-server" + client_nonce + nonce, hashlib.sha256).digest()


def check(expected: bytes, got: bytes) -> bool:
    return hmac.compare_digest(expected, got)
