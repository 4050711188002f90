"""Ed25519 signing keys: the private half stays in auth_service, the public half is the JWKS."""

import json
import secrets

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from jwt.algorithms import OKPAlgorithm
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from auth_service.models import SigningKey
from common.tokens import ALGORITHM


def _new_key() -> SigningKey:
    private = Ed25519PrivateKey.generate()
    kid = secrets.token_hex(8)
    jwk = json.loads(OKPAlgorithm.to_jwk(private.public_key()))
    jwk.update({"kid": kid, "alg": ALGORITHM, "use": "sig"})
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return SigningKey(kid=kid, private_key_pem=pem, public_jwk=jwk, active=True)


async def active_key(session: AsyncSession) -> SigningKey:
    """The newest active key; creates the first one on a fresh database."""
    key = await session.scalar(
        select(SigningKey).where(SigningKey.active).order_by(SigningKey.created_at.desc()).limit(1)
    )
    if key is None:
        key = _new_key()
        session.add(key)
        await session.flush()
    return key


async def public_jwks(session: AsyncSession) -> dict:
    keys = (await session.scalars(select(SigningKey).where(SigningKey.active))).all()
    return {"keys": [k.public_jwk for k in keys]}


def sign(key: SigningKey, claims: dict) -> str:
    private = serialization.load_pem_private_key(key.private_key_pem.encode(), password=None)
    return jwt.encode(claims, private, algorithm=ALGORITHM, headers={"kid": key.kid})
