"""NATS subject and JetStream stream names.

Every subject a provider publishes or consumes carries its provider id, so NATS
permissions can confine each daemon to its own subjects.
"""

JOBS_STREAM = "JOBS"
TASKS_STREAM = "TASKS"
EVENTS_STREAM = "EVENTS"
LOGS_STREAM = "LOGS"
PROVIDERS_STREAM = "PROVIDERS"

JOB_SUBMITTED = "jobs.submitted"
SCHEDULER_DURABLE = "scheduler"
SCHEDULER_EVENTS_DURABLE = "scheduler-events"
SCHEDULER_LOST_DURABLE = "scheduler-provider-lost"


def tasks_subject(provider_id: str) -> str:
    return f"tasks.{provider_id}"


def provider_durable(provider_id: str) -> str:
    return f"provider-{provider_id}"


def event_subject(provider_id: str, job_id: str) -> str:
    return f"events.{provider_id}.{job_id}"


def log_subject(provider_id: str, job_id: str) -> str:
    return f"logs.{provider_id}.{job_id}"


def job_logs_filter(job_id: str) -> str:
    return f"logs.*.{job_id}"


# Core NATS, not a stream: pull progress is worth nothing once the next update (within a
# second) or the pull's end is there, so it is neither stored nor acked, and a slow NATS
# can't hold up a pull. A follower who connects mid-pull sees the next update; one who
# connects after it sees the job's status instead. No stream's subjects cover `pulls.>`.
def pull_subject(provider_id: str, job_id: str) -> str:
    return f"pulls.{provider_id}.{job_id}"


def job_pulls_filter(job_id: str) -> str:
    return f"pulls.*.{job_id}"


def heartbeat_subject(provider_id: str) -> str:
    return f"heartbeats.{provider_id}"


HEARTBEATS_WILDCARD = "heartbeats.*"
# Registry replicas share the heartbeats: each one is ingested by one replica.
HEARTBEATS_QUEUE = "provider-registry"


def provider_lost_subject(provider_id: str) -> str:
    return f"provider.lost.{provider_id}"


PROVIDER_LOST_WILDCARD = "provider.lost.*"


def msg_id(job_id: str, attempt: int, kind: str) -> str:
    """Nats-Msg-Id for JetStream de-duplication of one message per job attempt."""
    return f"{job_id}:{attempt}:{kind}"


# Core NATS (not persisted): a hint that free capacity may have appeared, so the
# scheduler runs a placement pass now instead of at its next periodic one.
CAPACITY_CHANGED = "capacity.changed"

# Core NATS: a user's or a machine's credentials changed (logout, revocation, disabled
# user); every gateway replica drops its cached answers for them (gateway/auth_cache.py).
AUTH_CHANGED = "auth.changed"
