"""What a failed API call raises."""

from typing import Any

import httpx


class ApiError(Exception):
    """The platform answered 4xx or 5xx. `field` names the input at fault when it said so
    (422: a dotted path into the body, like "resources.gpus")."""

    def __init__(self, status_code: int, body: Any, retry_after: str | None = None) -> None:
        self.status_code = status_code
        self.body = body
        self.retry_after = retry_after
        self.detail: str = str(body.get("detail")) if isinstance(body, dict) else str(body)
        errors = body.get("errors") if isinstance(body, dict) else None
        self.errors: list[dict[str, str]] = errors if isinstance(errors, list) else []
        self.field: str | None = self.errors[0].get("field") if self.errors else None
        super().__init__(f"{status_code}: {self.detail}")

    @classmethod
    def from_response(cls, response: httpx.Response) -> "ApiError":
        try:
            body: Any = response.json()
        except ValueError:
            body = response.text or response.reason_phrase
        return cls(response.status_code, body, response.headers.get("Retry-After"))


class TransferError(Exception):
    """An upload or download to object storage failed, or arrived damaged."""
