"""A small synchronous client for the public REST API."""

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import connect_sse


class ApiError(Exception):
    def __init__(self, status_code: int, body: Any) -> None:
        detail = body.get("detail") if isinstance(body, dict) else body
        super().__init__(f"{status_code}: {detail}")
        self.status_code = status_code
        self.body = body


class Client:
    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        timeout: float = 30.0,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.http = httpx.Client(base_url=base_url, timeout=timeout, headers=headers)
        self.token = token
        self.refresh_token: str | None = None

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.http.request(method, path, headers=self._headers(), **kwargs)
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = response.text
            raise ApiError(response.status_code, body)
        if response.headers.get("content-type", "").startswith("application/json"):
            return response.json()
        return response.text

    def register(self, email: str, password: str, roles: str | list[str]) -> dict:
        roles = [roles] if isinstance(roles, str) else roles
        return self.request(
            "POST", "/v1/auth/register", json={"email": email, "password": password, "roles": roles}
        )

    def login(self, email: str, password: str) -> str:
        tokens = self.request("POST", "/v1/auth/login", json={"email": email, "password": password})
        self.token = tokens["access_token"]
        self.refresh_token = tokens["refresh_token"]
        return self.token

    def register_or_login(self, email: str, password: str, role: str | list[str]) -> str:
        try:
            self.register(email, password, role)
        except ApiError as exc:
            if exc.status_code != 409:
                raise
        return self.login(email, password)

    def upload(self, filename: str, data: bytes | Path) -> dict:
        """Registers a file and PUTs its bytes to the presigned URL; returns the record."""
        content = data.read_bytes() if isinstance(data, Path) else data
        record = self.request(
            "POST", "/v1/files", json={"filename": filename, "size": len(content)}
        )
        response = httpx.put(record["upload_url"], content=content, timeout=120)
        if response.status_code >= 300:
            raise ApiError(response.status_code, response.text)
        return record

    def submit(self, spec: dict) -> dict:
        return self.request("POST", "/v1/jobs", json=spec)

    def job(self, job_id: str) -> dict:
        return self.request("GET", f"/v1/jobs/{job_id}")

    def events(self, job_id: str, timeout: float = 300.0) -> Iterator[tuple[str, dict]]:
        """Yields (event, data) from the job's live stream until it ends."""
        with httpx.Client(
            base_url=str(self.http.base_url), timeout=httpx.Timeout(timeout, connect=5)
        ) as http:
            with connect_sse(
                http, "GET", f"/v1/jobs/{job_id}/events", headers=self._headers()
            ) as source:
                if source.response.status_code >= 400:
                    source.response.read()
                    raise ApiError(source.response.status_code, source.response.text)
                for sse in source.iter_sse():
                    yield sse.event, json.loads(sse.data)
                    if sse.event == "end":
                        return

    def outputs(self, job_id: str) -> list[dict]:
        return self.request("GET", f"/v1/jobs/{job_id}/outputs")

    def download(self, url: str) -> bytes:
        response = httpx.get(url, timeout=120)
        if response.status_code >= 300:
            raise ApiError(response.status_code, response.text)
        return response.content
