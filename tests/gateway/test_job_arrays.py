"""Job arrays: POST /v1/jobs/batch and GET /v1/jobs?array=, on the real platform.

Every job here asks a price no machine offers, so it stays queued instead of running on
the shared local daemon, and each test cancels what it submitted.
"""

import asyncio
import time
from collections.abc import Iterator

import pytest

from common.db import make_engine, make_sessionmaker
from gpumarket.client import ApiError, Client
from gpumarket.platform import SAMPLE_IMAGE, LocalPlatform
from scheduler import job_store
from tests.fixtures.platform import new_user
from tests.scheduler.placing import BILLING

MISSING_FILE = "00000000-0000-0000-0000-000000000000"


def spec(**overrides) -> dict:  # type: ignore[no-untyped-def]
    return {
        "image": SAMPLE_IMAGE,
        "command": ["true"],
        "resources": {"gpus": 1},
        "max_duration_s": 60,
        "max_price_per_gpu_hour": 0.000001,
        **overrides,
    }


def submit_array(client: Client, body: dict) -> dict:
    return client.request("POST", "/v1/jobs/batch", json=body)


def array_jobs(client: Client, array_id: str, **params) -> list[dict]:  # type: ignore[no-untyped-def]
    return client.request("GET", "/v1/jobs", params={"array": array_id, "limit": 1000, **params})


def refused(client: Client, body: dict) -> dict:
    with pytest.raises(ApiError) as err:
        submit_array(client, body)
    assert err.value.status_code == 422, err.value.body
    assert err.value.body["detail"]
    return err.value.body


def fields(error: dict) -> list[str]:
    return [e["field"] for e in error["errors"]]


def cancel_all(platform: LocalPlatform, job_ids: list[str]) -> None:
    """Cancels many jobs at once through the job store: the API's per-user rate limit
    (50/s) makes a thousand cancel calls take longer than the test itself."""

    async def cancel() -> None:
        assert platform.servers is not None
        engine = make_engine(platform.servers.postgres.url)
        try:
            async with make_sessionmaker(engine).begin() as session:
                for job_id in job_ids:
                    job = await job_store.request_cancel(session, job_id, None, BILLING)
                    assert job.provider_id is None, "an array job of this test was placed"
        finally:
            await engine.dispose()

    asyncio.run(cancel())


@pytest.fixture
def cancel_after(requester: Client) -> Iterator[list[str]]:
    """Ids appended here are cancelled through the API when the test ends."""
    ids: list[str] = []
    yield ids
    for job_id in ids:
        requester.request("POST", f"/v1/jobs/{job_id}/cancel")


class TestSubmitArray:
    def test_thousand_copies_of_a_template(self, platform, requester: Client) -> None:  # type: ignore[no-untyped-def]
        started = time.monotonic()
        answer = submit_array(requester, {"template": spec(), "count": 1000})
        took = time.monotonic() - started
        jobs = answer["jobs"]
        try:
            assert answer["count"] == 1000 and len(jobs) == 1000
            assert [j["array_index"] for j in jobs] == list(range(1000))
            assert {j["array_id"] for j in jobs} == {answer["array_id"]}
            assert len({j["id"] for j in jobs}) == 1000
            assert {j["status"] for j in jobs} == {"queued"}
            assert took < 10, f"a 1,000-job array took {took:.1f}s"

            listed = array_jobs(requester, answer["array_id"])
            assert [j["id"] for j in listed] == [j["id"] for j in jobs]
            assert all(j["queue"] is None for j in listed)  # the list computes no queue info
            first_ten = array_jobs(requester, answer["array_id"], status="queued", limit=10)
            assert [j["array_index"] for j in first_ten] == list(range(10))
            assert array_jobs(requester, answer["array_id"], status="running") == []

            # An array's jobs queue in index order.
            one = requester.job(jobs[0]["id"])
            last = requester.job(jobs[-1]["id"])
            if one.status == last.status == "queued":
                assert one.queue and last.queue and one.queue.position < last.queue.position
        finally:
            cancel_all(platform, [j["id"] for j in jobs])

    def test_each_job_its_own_spec(self, requester: Client, cancel_after: list[str]) -> None:
        specs = [spec(command=["echo", str(i)], priority=i, env={"PART": str(i)}) for i in range(5)]
        answer = submit_array(requester, {"jobs": specs})
        cancel_after.extend(j["id"] for j in answer["jobs"])
        assert answer["count"] == 5
        assert [j["command"] for j in answer["jobs"]] == [["echo", str(i)] for i in range(5)]
        assert [j["priority"] for j in answer["jobs"]] == list(range(5))
        assert [j["array_index"] for j in answer["jobs"]] == list(range(5))
        job = requester.job(answer["jobs"][3]["id"])
        assert job.array_id == answer["array_id"] and job.array_index == 3

    def test_one_file_shared_by_every_job(self, requester: Client, cancel_after: list[str]) -> None:
        upload = requester.upload(b"shared input\n", "shared.txt")
        inputs = [{"file_id": upload.file_id, "path": "shared.txt"}]
        answer = submit_array(requester, {"template": spec(inputs=inputs), "count": 20})
        cancel_after.extend(j["id"] for j in answer["jobs"])
        assert answer["count"] == 20


class TestAllOrNothing:
    def test_one_bad_spec_refuses_the_whole_array(self, requester: Client) -> None:
        specs = [spec() for _ in range(10)]
        specs[7] = spec(image="")
        error = refused(requester, {"jobs": specs})
        assert fields(error) == ["jobs.7.image"]
        assert requester.request("GET", "/v1/jobs") == []

    def test_nested_field_is_named_with_its_index(self, requester: Client) -> None:
        specs = [spec(), spec(resources={"gpus": 0})]
        assert fields(refused(requester, {"jobs": specs})) == ["jobs.1.resources.gpus"]
        template = spec(resources={"gpus": 0})
        error = refused(requester, {"template": template, "count": 3})
        assert fields(error) == ["template.resources.gpus"]

    def test_missing_input_file_refuses_the_whole_array(self, requester: Client) -> None:
        upload = requester.upload(b"fine\n", "ok.txt")
        good = [{"file_id": upload.file_id, "path": "ok.txt"}]
        bad = [*good, {"file_id": MISSING_FILE, "path": "missing.txt"}]
        specs = [spec(inputs=good), spec(inputs=good), spec(inputs=bad), spec(inputs=bad)]
        error = refused(requester, {"jobs": specs})
        assert fields(error) == ["jobs.2.inputs.1.file_id"]
        error = refused(requester, {"template": spec(inputs=bad), "count": 5})
        assert fields(error) == ["template.inputs.1.file_id"]
        assert requester.request("GET", "/v1/jobs") == []

    def test_someone_elses_file_is_missing(self, platform, requester: Client) -> None:  # type: ignore[no-untyped-def]
        theirs = new_user(platform).upload(b"secret", "secret.txt")
        inputs = [{"file_id": theirs.file_id, "path": "s"}]
        error = refused(requester, {"template": spec(inputs=inputs), "count": 2})
        assert fields(error) == ["template.inputs.0.file_id"]


class TestArrayForm:
    @pytest.mark.parametrize(
        ("body", "field"),
        [
            ({"jobs": [spec()], "template": spec(), "count": 1}, "template"),
            ({"jobs": [spec()], "count": 1}, "count"),
            ({}, "jobs"),
            ({"template": spec()}, "count"),
            ({"count": 2}, "template"),
            ({"template": spec(), "count": 0}, "count"),
            ({"template": spec(), "count": 1001}, "count"),
            ({"jobs": []}, "jobs"),
            ({"jobs": [spec()] * 1001}, "jobs"),
            ({"jobs": [spec()], "surprise": 1}, "surprise"),
        ],
    )
    def test_bad_form_is_422_naming_the_field(self, requester: Client, body, field) -> None:  # type: ignore[no-untyped-def]
        assert field in fields(refused(requester, body))
        assert requester.request("GET", "/v1/jobs") == []


class TestListArray:
    def test_array_must_be_a_uuid(self, requester: Client) -> None:
        with pytest.raises(ApiError) as err:
            requester.request("GET", "/v1/jobs", params={"array": "not-a-uuid"})
        assert err.value.status_code == 422
        assert fields(err.value.body) == ["array"]

    def test_someone_elses_array_lists_empty(
        self, platform, admin: Client, requester: Client, cancel_after: list[str]
    ) -> None:  # type: ignore[no-untyped-def]
        answer = submit_array(requester, {"template": spec(), "count": 3})
        cancel_after.extend(j["id"] for j in answer["jobs"])
        assert array_jobs(new_user(platform), answer["array_id"]) == []
        # An admin sees everyone's.
        assert len(array_jobs(admin, answer["array_id"])) == 3
