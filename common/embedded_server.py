"""uvicorn inside a worker's own event loop (for /healthz and /metrics of non-HTTP services)."""

from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn


class EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves SIGTERM/SIGINT to the process that embeds it.

    uvicorn's serve() takes over the signals while it runs and re-raises them only once
    it has stopped, so the worker's own shutdown would never start.
    """

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield
