from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, EmailStr, Field, field_validator

from common.types import SafeStr

SelfServiceRole = Literal["requester", "provider"]
Role = Literal["requester", "provider", "admin"]


def _unique(roles: list[str]) -> list[str]:
    if len(set(roles)) != len(roles):
        raise ValueError("roles must not repeat")
    return roles


class RegisterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    email: EmailStr
    password: str = Field(max_length=256)
    # One account may both buy and sell; admins are made with `gpumarket admin create-user`.
    roles: list[SelfServiceRole] = Field(min_length=1, max_length=2)

    _unique_roles = field_validator("roles")(_unique)


class LoginRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    email: EmailStr
    password: str = Field(max_length=256)


class RefreshRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    refresh_token: str = Field(min_length=1, max_length=256)


class LogoutRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Ends every session of the user, not only the one the access token belongs to.
    everywhere: bool = False


class SessionLogout(BaseModel):
    user_id: str
    session_id: str | None
    everywhere: bool


class UserOut(BaseModel):
    id: str
    email: str
    roles: list[str]
    disabled: bool
    created_at: datetime


class TokenOut(BaseModel):
    access_token: str
    token_type: Literal["bearer"] = "bearer"
    expires_in: int
    refresh_token: str
    refresh_expires_in: int


class ApiKeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: SafeStr = Field(min_length=1, max_length=100)
    # Defaults to every role the user has; a subset limits what the key can do.
    roles: list[Role] | None = Field(default=None, min_length=1, max_length=3)
    expires_in_days: int | None = Field(default=None, ge=1, le=3650)

    @field_validator("roles")
    @classmethod
    def _unique_roles(cls, roles: list[str] | None) -> list[str] | None:
        return None if roles is None else _unique(roles)


class ApiKeyOut(BaseModel):
    id: str
    name: str
    prefix: str
    roles: list[str]
    expires_at: datetime | None
    last_used_at: datetime | None
    revoked_at: datetime | None
    created_at: datetime


class ApiKeyCreated(ApiKeyOut):
    # The only time the secret is shown.
    key: str


class AuthenticateRequest(BaseModel):
    """What the gateway asks for each request: is this credential still good, and whose?"""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["session", "api_key", "agent"]
    # For "session": the claims of an access token the gateway already verified.
    user_id: str | None = None
    session_id: str | None = None
    # For "api_key" and "agent": the secret itself.
    secret: str | None = Field(default=None, max_length=256)


class PrincipalOut(BaseModel):
    kind: Literal["session", "api_key"]
    user_id: str
    email: str
    roles: list[str]
    session_id: str | None = None
    api_key_id: str | None = None


class AgentOut(BaseModel):
    kind: Literal["agent"] = "agent"
    provider_id: str
    owner_id: str


class JoinTokenCreate(BaseModel):
    owner_id: str


class JoinTokenOut(BaseModel):
    token: str
    expires_at: datetime


class JoinTokenRedeem(BaseModel):
    token: str
    machine_id: str = Field(min_length=1, max_length=64)


class AgentCredentialOut(BaseModel):
    provider_id: str
    owner_id: str
    credential: str


class RevokedOut(BaseModel):
    revoked: int


class SigningKeyOut(BaseModel):
    kid: str
    activates_at: datetime
