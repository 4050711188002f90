from fastapi import APIRouter, Depends, Response, status

from common.errors import NotFound
from common.ids import is_uuid
from gateway import storage as storage_calls
from gateway.api import deps
from gateway.clients import ServiceClient
from gateway.schemas import FileCreateRequest
from gateway.security import Principal, require
from storage_service.schemas import FileOut, FileUpload, Usage

router = APIRouter(tags=["files"])


@router.post("/v1/files", status_code=status.HTTP_201_CREATED, response_model=FileUpload)
async def create_file(
    body: FileCreateRequest,
    principal: Principal = Depends(require("requester")),
    storage: ServiceClient = Depends(deps.storage),
) -> dict:
    """Registers a file and returns a presigned URL to PUT its bytes to (only bytes with
    the given size and sha256). 403 naming `size` when it would pass the storage quota."""
    return await storage.request(
        "POST", "/internal/files", json={"owner_id": principal.id, **body.model_dump()}
    )


# Declared before /v1/files/{file_id}, which would otherwise take "usage" for an id.
@router.get("/v1/files/usage", response_model=Usage)
async def storage_usage(
    principal: Principal = Depends(require("requester")),
    storage: ServiceClient = Depends(deps.storage),
) -> Usage:
    """The caller's stored bytes (input files, job outputs and logs) against the quota."""
    return await storage_calls.usage(storage, principal.id)


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


@router.delete("/v1/files/{file_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_file(
    file_id: str,
    principal: Principal = Depends(require("requester")),
    storage: ServiceClient = Depends(deps.storage),
) -> Response:
    """Deletes the file and its bytes, freeing its space in the quota. Jobs that still
    need it as an input fail to start."""
    if not is_uuid(file_id):
        raise NotFound(f"file {file_id} not found")
    await storage.request("DELETE", f"/internal/files/{file_id}", params=principal.owner_params())
    return Response(status_code=status.HTTP_204_NO_CONTENT)
