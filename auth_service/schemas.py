from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, EmailStr, Field


class RegisterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    email: EmailStr
    password: str = Field(max_length=256)
    role: Literal["requester", "provider"]


class LoginRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    email: EmailStr
    password: str = Field(max_length=256)


class UserOut(BaseModel):
    id: str
    email: str
    roles: list[str]
    created_at: datetime


class TokenOut(BaseModel):
    access_token: str
    token_type: Literal["bearer"] = "bearer"
    expires_in: int


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
    credential_expires_at: datetime
