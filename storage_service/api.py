"""/internal routes of storage_service, called by the gateway."""

from fastapi import APIRouter, Depends, Request, Response, status

from common.service_app import get_sessionmaker
from storage_service import quota, service, uploads
from storage_service.s3 import ObjectStore
from storage_service.schemas import (
    CompletedObject,
    CompleteMultipart,
    FileCreate,
    FileOut,
    FileUpload,
    MultipartRef,
    PresignedUrls,
    PresignRequest,
    UploadsPlan,
    UploadsRequest,
    Usage,
)

internal = APIRouter(prefix="/internal")
Db = Depends(get_sessionmaker)


async def _store(request: Request) -> ObjectStore:
    return request.app.state.store


@internal.post("/files", status_code=status.HTTP_201_CREATED, response_model=FileUpload)
async def create_file(body: FileCreate, db=Db, store=Depends(_store)) -> FileUpload:
    async with db.begin() as session:
        return await service.create_file(session, store, body)


@internal.get("/files/{file_id}", response_model=FileOut)
async def get_file(
    file_id: str, owner_id: str | None = None, db=Db, store=Depends(_store)
) -> FileOut:
    async with db.begin() as session:
        return await service.get_file(session, store, file_id, owner_id)


@internal.delete("/files/{file_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_file(
    file_id: str, owner_id: str | None = None, db=Db, store=Depends(_store)
) -> Response:
    async with db.begin() as session:
        await service.delete_file(session, store, file_id, owner_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@internal.get("/usage", response_model=Usage)
async def usage(owner_id: str, db=Db, store=Depends(_store)) -> Usage:
    async with db() as session:
        return await quota.usage(session, store.settings, owner_id)


@internal.post("/presign", response_model=PresignedUrls)
async def presign(body: PresignRequest, db=Db, store=Depends(_store)) -> PresignedUrls:
    """Many URLs of one bucket. Outputs and logs go up through /uploads (recorded for the
    quota); a GET of ones retention deleted is 410."""
    async with db() as session:
        return await uploads.presign_reads(session, store, body.bucket, body.keys, body.method)


@internal.post("/uploads", response_model=UploadsPlan)
async def plan_uploads(body: UploadsRequest, db=Db, store=Depends(_store)) -> UploadsPlan:
    async with db.begin() as session:
        return await uploads.plan_uploads(session, store, body)


@internal.post("/uploads/complete", response_model=CompletedObject)
async def complete_upload(body: CompleteMultipart, store=Depends(_store)) -> CompletedObject:
    return await uploads.complete_multipart(store, body)


@internal.post("/uploads/abort", status_code=status.HTTP_204_NO_CONTENT)
async def abort_upload(body: MultipartRef, db=Db, store=Depends(_store)) -> Response:
    async with db.begin() as session:
        await uploads.abort_multipart(session, store, body)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
