"""The gpumarket Python client: `Client` (sync) and `AsyncClient`, for the whole public
REST API, typed with the platform's own schemas.

    with Client("https://api.example.com", token=API_KEY) as client:
        job = client.submit({"image": "...", "command": [...], "max_duration_s": 600})
        for event in client.events(job.id):
            ...
"""

from gpumarket.client.aio import AsyncClient
from gpumarket.client.errors import ApiError, TransferError
from gpumarket.client.events import EndEvent, JobEvent, LogEvent, PullEvent, StatusEvent
from gpumarket.client.sync import Client

__all__ = [
    "ApiError",
    "AsyncClient",
    "Client",
    "EndEvent",
    "JobEvent",
    "LogEvent",
    "PullEvent",
    "StatusEvent",
    "TransferError",
]
