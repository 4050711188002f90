"""Domain errors that service layers raise; install_common turns them into 4xx JSON bodies."""


class DomainError(Exception):
    status_code = 400

    def __init__(self, detail: str, field: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.field = field

    def body(self) -> dict:
        body: dict = {"detail": self.detail}
        if self.field:
            body["errors"] = [{"field": self.field, "reason": self.detail}]
        return body

    def headers(self) -> dict[str, str]:
        """Response headers that go with the error; a 401 asks for a bearer token."""
        if self.status_code == 401:
            return {"WWW-Authenticate": "Bearer"}
        return {}


class Invalid(DomainError):
    status_code = 422


class Unauthorized(DomainError):
    status_code = 401


class Forbidden(DomainError):
    status_code = 403


class NotFound(DomainError):
    status_code = 404


class Conflict(DomainError):
    status_code = 409


class Gone(DomainError):
    status_code = 410


class TooManyRequests(DomainError):
    """A rate limit refused the request; `retry_after` is the seconds until one would pass."""

    status_code = 429

    def __init__(self, detail: str, retry_after: int, field: str | None = None) -> None:
        super().__init__(detail, field)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {**super().headers(), "Retry-After": str(self.retry_after)}
