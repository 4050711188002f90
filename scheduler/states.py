"""Job states: queued -> assigned -> running -> succeeded | failed | cancelled | timed_out."""

QUEUED = "queued"
ASSIGNED = "assigned"
RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"
TIMED_OUT = "timed_out"

ACTIVE = frozenset({ASSIGNED, RUNNING})
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED, TIMED_OUT})
ALL = (QUEUED, ASSIGNED, RUNNING, SUCCEEDED, FAILED, CANCELLED, TIMED_OUT)
