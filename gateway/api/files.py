from fastapi import APIRouter, Depends, status

from common.errors import NotFound
from common.ids import is_uuid
from gateway.api import deps
from gateway.clients import ServiceClient
from gateway.schemas import FileCreateRequest
from gateway.security import Principal, require
from storage_service.schemas import FileOut, FileUpload

router = APIRouter(tags=["files"])


@router.post("/v1/files", status_code=status.HTTP_201_CREATED, response_model=FileUpload)
async def create_file(
    body: FileCreateRequest,
    principal: Principal = Depends(require("requester")),
    storage: ServiceClient = Depends(deps.storage),
) -> dict:
    """Registers a file and returns a presigned URL to PUT its bytes to."""
    return await storage.request(
        "POST", "/internal/files", json={"owner_id": principal.id, **body.model_dump()}
    )


@router.get("/v1/files/{file_id}", response_model=FileOut)
async def get_file(
    file_id: str,
    principal: Principal = Depends(require("requester")),
    storage: ServiceClient = Depends(deps.storage),
) -> dict:
    if not is_uuid(file_id):
        raise NotFound(f"file {file_id} not found")
    return await storage.request(
        "GET", f"/internal/files/{file_id}", params=principal.owner_params()
    )
