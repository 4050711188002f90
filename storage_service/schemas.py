from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from common.types import SafeStr


class FileCreate(BaseModel):
    owner_id: str
    filename: SafeStr = Field(min_length=1, max_length=255)
    size: int = Field(ge=0)


class FileUpload(BaseModel):
    file_id: str
    filename: str
    size: int
    upload_url: str
    expires_at: datetime


class FileOut(BaseModel):
    file_id: str
    filename: str
    size: int
    download_url: str
    expires_at: datetime


class PresignRequest(BaseModel):
    bucket: Literal["inputs", "outputs", "logs"]
    key: str = Field(min_length=1, max_length=1024)
    method: Literal["GET", "PUT"]


class PresignedUrl(BaseModel):
    url: str
    expires_at: datetime
