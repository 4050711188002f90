"""Secrets handed out by auth_service: random, prefixed by kind, stored as a digest."""

import hashlib
import secrets
from datetime import timedelta

# Writing last_used_at on every request would turn reads into writes; once a minute is
# precise enough to tell a live key or daemon from a forgotten one.
LAST_USED_RESOLUTION = timedelta(seconds=60)


def new_secret(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


def digest(secret: str) -> str:
    """SHA-256 suffices: the secrets are 256 random bits, not guessable passwords."""
    return hashlib.sha256(secret.encode()).hexdigest()
