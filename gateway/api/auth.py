from fastapi import APIRouter, Depends, status

from auth_service.schemas import LoginRequest, RegisterRequest, TokenOut, UserOut
from gateway.api import deps
from gateway.clients import ServiceClient
from gateway.security import Principal, current_principal

router = APIRouter(tags=["auth"])


@router.post("/v1/auth/register", status_code=status.HTTP_201_CREATED, response_model=UserOut)
async def register(body: RegisterRequest, auth: ServiceClient = Depends(deps.auth)) -> dict:
    return await auth.request("POST", "/v1/auth/register", json=body.model_dump())


@router.post("/v1/auth/login", response_model=TokenOut)
async def login(body: LoginRequest, auth: ServiceClient = Depends(deps.auth)) -> dict:
    return await auth.request("POST", "/v1/auth/login", json=body.model_dump())


@router.get("/v1/me", response_model=UserOut)
async def me(
    principal: Principal = Depends(current_principal), auth: ServiceClient = Depends(deps.auth)
) -> dict:
    return await auth.request("GET", f"/internal/users/{principal.id}")
