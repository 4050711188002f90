"""/internal routes of storage_service, called by the gateway."""

import asyncio

from fastapi import APIRouter, Depends, Request, status

from common.service_app import get_sessionmaker
from storage_service import service
from storage_service.s3 import ObjectStore
from storage_service.schemas import FileCreate, FileOut, FileUpload, PresignedUrls, PresignRequest

internal = APIRouter(prefix="/internal")
Db = Depends(get_sessionmaker)


def _store(request: Request) -> ObjectStore:
    return request.app.state.store


@internal.post("/files", status_code=status.HTTP_201_CREATED, response_model=FileUpload)
async def create_file(body: FileCreate, db=Db, store=Depends(_store)) -> FileUpload:
    async with db.begin() as session:
        return await service.create_file(session, store, body.owner_id, body.filename, body.size)


@internal.get("/files/{file_id}", response_model=FileOut)
async def get_file(
    file_id: str, owner_id: str | None = None, db=Db, store=Depends(_store)
) -> FileOut:
    async with db.begin() as session:
        return await service.get_file(session, store, file_id, owner_id)


@internal.post("/presign", response_model=PresignedUrls)
async def presign(body: PresignRequest, store=Depends(_store)) -> PresignedUrls:
    urls, expires_at = await asyncio.to_thread(
        store.presign_many, body.bucket, body.keys, body.method
    )
    return PresignedUrls(urls=urls, expires_at=expires_at)
