"""Ed25519 signing keys: the private half stays in auth_service, the public half is the JWKS.

Rotation publishes the next key before it signs anything (activation delay longer than
a gateway's JWKS cache age) and keeps the old public key until its last token expired.
"""

import json
import secrets
from datetime import UTC, datetime, timedelta

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from jwt.algorithms import OKPAlgorithm
from sqlalchemy import delete, func, or_, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from auth_service.models import SigningKey
from auth_service.settings import AuthSettings
from common.tokens import ALGORITHM

# Serialises key creation between auth_service replicas (an arbitrary, fixed number).
_KEY_LOCK = 7_031_001


def _new_key(activates_at: datetime) -> SigningKey:
    private = Ed25519PrivateKey.generate()
    kid = secrets.token_hex(8)
    jwk = json.loads(OKPAlgorithm.to_jwk(private.public_key()))
    jwk.update({"kid": kid, "alg": ALGORITHM, "use": "sig"})
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return SigningKey(kid=kid, private_key_pem=pem, public_jwk=jwk, activates_at=activates_at)


async def _current(session: AsyncSession) -> SigningKey | None:
    now = datetime.now(UTC)
    return await session.scalar(
        select(SigningKey)
        .where(
            SigningKey.activates_at <= now,
            or_(SigningKey.retired_at.is_(None), SigningKey.retired_at > now),
        )
        .order_by(SigningKey.activates_at.desc())
        .limit(1)
    )


async def signing_key(session: AsyncSession, settings: AuthSettings) -> SigningKey:
    """The key that signs now; creates the first one, and rotates one that grew too old."""
    key = await _current(session)
    max_age = timedelta(days=settings.signing_key_max_age_days)
    if key is not None and key.activates_at + max_age > datetime.now(UTC):
        return key
    await session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _KEY_LOCK})
    key = await _current(session)
    if key is None:
        key = _new_key(activates_at=datetime.now(UTC))
        session.add(key)
        await session.flush()
        return key
    pending = await session.scalar(
        select(func.count())
        .select_from(SigningKey)
        .where(SigningKey.activates_at > datetime.now(UTC))
    )
    if key.activates_at + max_age <= datetime.now(UTC) and not pending:
        await rotate(session, settings)
    return key


async def rotate(session: AsyncSession, settings: AuthSettings) -> SigningKey:
    """Creates the next key, which starts signing after the activation delay."""
    now = datetime.now(UTC)
    activates_at = now + timedelta(seconds=settings.signing_key_activation_delay_s)
    new = _new_key(activates_at)
    # Keys still signing hand over to the new one when it activates.
    for key in (
        await session.scalars(
            select(SigningKey).where(
                or_(SigningKey.retired_at.is_(None), SigningKey.retired_at > activates_at)
            )
        )
    ).all():
        key.retired_at = activates_at
    session.add(new)
    # Private keys no token can need any more are deleted, not kept around.
    await session.execute(
        delete(SigningKey).where(SigningKey.retired_at < now - _token_lifetime(settings))
    )
    await session.flush()
    return new


def _token_lifetime(settings: AuthSettings) -> timedelta:
    # Tokens signed just before retirement stay valid this long (plus clock skew).
    return timedelta(seconds=settings.access_token_ttl_s + 60)


async def public_jwks(session: AsyncSession, settings: AuthSettings) -> dict:
    cutoff = datetime.now(UTC) - _token_lifetime(settings)
    keys = (
        await session.scalars(
            select(SigningKey)
            .where(or_(SigningKey.retired_at.is_(None), SigningKey.retired_at > cutoff))
            .order_by(SigningKey.activates_at)
        )
    ).all()
    return {"keys": [k.public_jwk for k in keys]}


def sign(key: SigningKey, claims: dict) -> str:
    private = serialization.load_pem_private_key(key.private_key_pem.encode(), password=None)
    return jwt.encode(claims, private, algorithm=ALGORITHM, headers={"kid": key.kid})
