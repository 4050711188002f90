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
    """Many objects of one bucket at once: a task's outputs are signed in one call."""

    bucket: Literal["inputs", "outputs", "logs"]
    keys: list[SafeStr] = Field(min_length=1, max_length=10_000)
    method: Literal["GET", "PUT"]


class PresignedUrls(BaseModel):
    urls: list[str]  # in the order of the keys
    expires_at: datetime
