"""Idempotent creation of the platform's JetStream streams."""

from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError

from common import subjects

DAY_S = 24 * 3600.0

STREAMS: list[StreamConfig] = [
    # Work queues: a message is gone once a consumer acks it.
    StreamConfig(
        name=subjects.JOBS_STREAM,
        subjects=["jobs.>"],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        duplicate_window=120.0,
    ),
    StreamConfig(
        name=subjects.TASKS_STREAM,
        subjects=["tasks.>"],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        duplicate_window=120.0,
    ),
    StreamConfig(
        name=subjects.EVENTS_STREAM,
        subjects=["events.>"],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=7 * DAY_S,
        duplicate_window=120.0,
    ),
    # Log lines are bulky and only useful for a while; old ones go first.
    StreamConfig(
        name=subjects.LOGS_STREAM,
        subjects=["logs.>"],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=7 * DAY_S,
        max_bytes=4 * 1024**3,
        discard=DiscardPolicy.OLD,
        duplicate_window=120.0,
    ),
    # Fleet events (provider.lost.<id>) for the scheduler; kept a week for the record.
    StreamConfig(
        name=subjects.PROVIDERS_STREAM,
        subjects=["provider.>"],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=7 * DAY_S,
        duplicate_window=120.0,
    ),
]


async def ensure_streams(js: JetStreamContext) -> None:
    for config in STREAMS:
        try:
            await js.add_stream(config)
        except BadRequestError:
            # Exists with a different config (an older version): bring it up to date.
            await js.update_stream(config)
