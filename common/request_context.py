"""The id of the request being served, so logs and upstream calls can name it."""

import re
import uuid
from contextvars import ContextVar

from starlette.datastructures import MutableHeaders
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID_HEADER = "X-Request-ID"
_HEADER_KEY = REQUEST_ID_HEADER.lower().encode("latin-1")
_VALID_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

# None outside a request (startup, background loops).
request_id: ContextVar[str | None] = ContextVar("request_id", default=None)


def _incoming_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == _HEADER_KEY:
            candidate = value.decode("latin-1")
            return candidate if _VALID_ID.fullmatch(candidate) else None
    return None


class RequestIdMiddleware:
    """Gives each request an id: the caller's `X-Request-ID` when well formed, else a new one.

    The id is in `request_id` while the request is served and goes back in the response's
    `X-Request-ID`. A pure ASGI middleware, so streamed responses pass through unbuffered.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        rid = _incoming_id(scope) or uuid.uuid4().hex
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = rid
            await send(message)

        token = request_id.set(rid)
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            # Starlette's own 500 is sent outside every middleware, without the id; answer
            # here so the caller has an id to quote. The id stays set on the way out so the
            # server's traceback log line carries it (each request runs in its own task).
            if scope["type"] == "http" and not started:
                response = JSONResponse(
                    {"detail": "internal server error"},
                    status_code=500,
                    headers={REQUEST_ID_HEADER: rid},
                )
                await response(scope, receive, send)
            raise
        request_id.reset(token)
