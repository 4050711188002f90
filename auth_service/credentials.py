"""Secrets handed out by auth_service: random, prefixed by kind, stored as a digest."""

import hashlib
import secrets


def new_secret(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


def digest(secret: str) -> str:
    """SHA-256 suffices: the secrets are 256 random bits, not guessable passwords."""
    return hashlib.sha256(secret.encode()).hexdigest()
