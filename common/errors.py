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
