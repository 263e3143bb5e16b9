"""API keys: 32 random bytes behind a visible prefix; only the SHA-256 of a key is stored and looked up."""

from __future__ import annotations

import hashlib
import secrets

KEY_PREFIX = "sk-unsloth-"
SHOWN_CHARS = len(KEY_PREFIX) + 6


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def shown_prefix(key: str) -> str:
    return key[:SHOWN_CHARS]
