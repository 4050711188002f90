"""storage_service apps of the tests' own, on the session's real S3 server and a migrated
database of their own (so a short retention sweeps nobody else's files)."""

import contextlib
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from minio import Minio

from common.settings import DEV_INTERNAL_TOKEN
from gpumarket.localstack.s3 import S3Server
from storage_service.app import create_app
from storage_service.settings import StorageSettings


@dataclass
class RunningStorage:
    app: FastAPI
    settings: StorageSettings
    http: httpx.AsyncClient  # calls its /internal routes
    s3: Minio  # the S3 server itself, with the platform's keys

    def bucket(self, kind: str) -> str:
        return self.settings.bucket(kind)


StartStorage = Callable[..., Awaitable[RunningStorage]]


@pytest.fixture
async def start_storage(
    unit_database_url: str, s3_server: S3Server, db: Any
) -> AsyncIterator[StartStorage]:
    """Starts storage_service (lifespan and all: buckets, lifecycle rules, the sweeper)
    with the given settings; buckets get a prefix of their own."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(**overrides: Any) -> RunningStorage:
            settings = StorageSettings(
                dev_mode=True,
                database_url=unit_database_url,
                s3_endpoint=s3_server.endpoint,
                s3_access_key=s3_server.access_key,
                s3_secret_key=s3_server.secret_key,
                s3_region=s3_server.region,
                bucket_prefix=f"t{secrets.token_hex(4)}",
                **overrides,
            )
            app = create_app(settings)
            await stack.enter_async_context(app.router.lifespan_context(app))
            http = await stack.enter_async_context(
                httpx.AsyncClient(
                    transport=httpx.ASGITransport(app=app),
                    base_url="http://storage",
                    headers={"X-Internal-Token": DEV_INTERNAL_TOKEN},
                )
            )
            return RunningStorage(app, settings, http, s3_server.client())

        yield start
