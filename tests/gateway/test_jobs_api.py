"""The walking skeleton's flow, through the public REST API, on the real platform."""

import hashlib
import time
from pathlib import Path

import httpx
import pytest

from gpumarket.client import ApiError, Client, LogEvent, StatusEvent
from gpumarket.platform import SAMPLE_IMAGE
from scheduler.schemas import JobOut
from tests.fixtures.platform import new_user

# A well-formed file registration, for tests that spoil one field of it.
A_FILE = {"filename": "f.txt", "size": 1, "sha256": hashlib.sha256(b"x").hexdigest()}


def wait_for(client: Client, job_id: str, predicate, timeout: float = 60.0) -> JobOut:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.job(job_id)
        if predicate(job):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job never reached the expected state: {client.job(job_id)}")


def job_spec(command: list[str], **overrides) -> dict:  # type: ignore[no-untyped-def]
    # The price cap keeps jobs off the daemon-less machines other tests register.
    return {
        "image": SAMPLE_IMAGE,
        "command": command,
        "resources": {"gpus": 1},
        "max_duration_s": 120,
        "max_price_per_gpu_hour": 1,
        **overrides,
    }


class TestJobRunsEndToEnd:
    def test_inputs_in_outputs_out_followed_live(self, requester: Client, tmp_path: Path) -> None:
        data = b"the quick brown fox\n" * 1000
        upload = requester.upload(data, "fox.txt")
        job = requester.submit(
            job_spec(
                [
                    "sh",
                    "-c",
                    "echo start; echo gpus=$NVIDIA_VISIBLE_DEVICES; "
                    "mkdir -p /outputs/sub; "
                    "tr a-z A-Z < /inputs/data/fox.txt > /outputs/sub/FOX.txt; "
                    "cp /inputs/data/fox.txt /outputs/copy.txt; echo finished",
                ],
                inputs=[{"file_id": upload.file_id, "path": "data/fox.txt"}],
            )
        )
        assert job.status == "queued"

        statuses, lines = [], []
        for event in requester.events(job.id):
            if isinstance(event, StatusEvent):
                statuses.append(event.job.status)
            elif isinstance(event, LogEvent):
                lines.append(event.line)
        assert statuses[-1] == "succeeded"
        assert "running" in statuses or "assigned" in statuses
        assert lines[0] == "start" and lines[-1] == "finished"
        assert lines[1].startswith("gpus=GPU-sim-")

        final = requester.job(job.id)
        assert final.exit_code == 0
        assert final.provider_id and final.started_at and final.finished_at

        outputs = {o.path: o for o in requester.outputs(job.id)}
        assert set(outputs) == {"sub/FOX.txt", "copy.txt"}
        expected = {"sub/FOX.txt": data.upper(), "copy.txt": data}
        for path, content in expected.items():
            downloaded = requester.download(outputs[path], tmp_path)
            assert downloaded == tmp_path / path
            assert downloaded.read_bytes() == content
            assert outputs[path].size == len(content)
            assert outputs[path].sha256 == hashlib.sha256(content).hexdigest()

        log_text = requester.logs(job.id)
        assert log_text.splitlines()[0] == "start"
        assert "finished" in log_text

    def test_nonzero_exit_fails_with_exit_code_and_log_tail(self, requester: Client) -> None:
        job = requester.submit(job_spec(["sh", "-c", "echo about to fail; exit 3"]))
        final = wait_for(requester, job.id, lambda j: j.finished_at is not None)
        assert final.status == "failed"
        assert final.exit_code == 3
        assert "3" in final.failure_reason
        assert "about to fail" in requester.logs(job.id)

    def test_gpu_model_nobody_has_waits_with_reason(self, requester: Client) -> None:
        job = requester.submit(job_spec(["true"], resources={"gpus": 1, "gpu_models": ["H100"]}))
        queued = wait_for(requester, job.id, lambda j: j.waiting_reason is not None)
        assert queued.status == "queued"
        assert "H100" in queued.waiting_reason
        assert "no provider" in queued.waiting_reason
        cancelled = requester.cancel(job.id)
        assert cancelled.status == "cancelled"

    def test_more_gpus_than_any_machine_has_waits_with_reason(self, requester: Client) -> None:
        job = requester.submit(job_spec(["true"], resources={"gpus": 8}))
        queued = wait_for(requester, job.id, lambda j: j.waiting_reason is not None)
        assert queued.status == "queued"
        assert "8" in queued.waiting_reason
        requester.cancel(job.id)

    def test_cancel_running_job_stops_it_and_frees_its_gpu(self, requester: Client) -> None:
        job = requester.submit(job_spec(["sh", "-c", "echo sleeping; sleep 300"]))
        wait_for(requester, job.id, lambda j: j.status == "running")
        requester.cancel(job.id)
        final = wait_for(requester, job.id, lambda j: j.finished_at is not None)
        assert final.status == "cancelled"
        # Both simulated GPUs are free again.
        wait_for(requester, job.id, lambda _: _free_gpus(requester) == 2)

    def test_timeout_ends_timed_out(self, requester: Client) -> None:
        job = requester.submit(job_spec(["sleep", "60"], max_duration_s=2))
        final = wait_for(requester, job.id, lambda j: j.finished_at is not None)
        assert final.status == "timed_out"

    def test_jobs_list_holds_own_jobs_only(self, platform, requester: Client) -> None:  # type: ignore[no-untyped-def]
        mine = requester.submit(job_spec(["true"]))
        other = new_user(platform)
        assert mine.id in [j.id for j in requester.jobs()]
        assert mine.id not in [j.id for j in other.jobs()]
        wait_for(requester, mine.id, lambda j: j.finished_at is not None)


def _free_gpus(client: Client) -> int:
    page = client.offers(model=["RTX 4090"])
    return sum(o.free_gpus for o in page.offers)


class TestJobInputErrors:
    @pytest.mark.parametrize(
        ("spec", "field"),
        [
            (job_spec([]), "command"),
            (job_spec(["true"], max_duration_s=0), "max_duration_s"),
            (job_spec(["true"], resources={"gpus": 0}), "resources.gpus"),
            (job_spec(["true"], env={"1BAD": "x"}), "env"),
            (
                job_spec(["true"], inputs=[{"file_id": "x", "path": "../etc/passwd"}]),
                "inputs.0.path",
            ),
            (job_spec(["true"], max_price_per_gpu_hour=-1), "max_price_per_gpu_hour"),
            ({**job_spec(["true"]), "surprise": 1}, "surprise"),
            ({"command": ["true"], "max_duration_s": 5}, "image"),
        ],
    )
    def test_bad_spec_is_422_naming_the_field(self, requester: Client, spec, field) -> None:  # type: ignore[no-untyped-def]
        with pytest.raises(ApiError) as err:
            requester.request("POST", "/v1/jobs", json=spec)
        assert err.value.status_code == 422
        assert field in [e["field"] for e in err.value.body["errors"]]
        assert err.value.body["detail"]

    def test_unknown_input_file_is_422_and_nothing_is_queued(self, requester: Client) -> None:
        before = requester.request("GET", "/v1/jobs")
        spec = job_spec(
            ["true"], inputs=[{"file_id": "00000000-0000-0000-0000-000000000000", "path": "a"}]
        )
        with pytest.raises(ApiError) as err:
            requester.request("POST", "/v1/jobs", json=spec)
        assert err.value.status_code == 422
        assert err.value.body["errors"][0]["field"] == "inputs.0.file_id"
        assert requester.request("GET", "/v1/jobs") == before

    def test_someone_elses_file_cannot_be_used(self, platform, requester: Client) -> None:  # type: ignore[no-untyped-def]
        theirs = new_user(platform).upload(b"secret", "secret.txt")
        with pytest.raises(ApiError) as err:
            requester.submit(job_spec(["true"], inputs=[{"file_id": theirs.file_id, "path": "s"}]))
        assert err.value.status_code == 422
        with pytest.raises(ApiError) as err:
            requester.request("GET", f"/v1/files/{theirs.file_id}")
        assert err.value.status_code == 404


class TestMalformedRequests:
    def test_invalid_json_is_422_on_the_body(self, platform, requester: Client) -> None:  # type: ignore[no-untyped-def]
        response = httpx.post(
            f"{platform.gateway_url}/v1/jobs",
            content=b"{bad json",
            headers={
                "Authorization": f"Bearer {requester.token}",
                "content-type": "application/json",
            },
        )
        assert response.status_code == 422
        assert response.json()["errors"][0]["field"] == "body"
        assert "invalid JSON" in response.json()["detail"]

    @pytest.mark.parametrize(
        ("method", "path", "kwargs", "status", "field"),
        [
            ("POST", "/v1/files", {"json": {**A_FILE, "filename": "a\x00b"}}, 422, "filename"),
            ("POST", "/v1/files", {"json": {**A_FILE, "filename": "a/b"}}, 422, "filename"),
            ("GET", "/v1/files/%00", {}, 404, None),
            ("GET", "/v1/offers", {"params": {"max_price": "1e999"}}, 422, "max_price"),
            ("GET", "/v1/offers", {"params": {"model": "\x00"}}, 422, "model.0"),
            ("GET", "/v1/jobs", {"params": {"status": "bogus"}}, 422, "status"),
        ],
    )
    def test_odd_input_is_4xx(self, requester: Client, method, path, kwargs, status, field) -> None:  # type: ignore[no-untyped-def]
        with pytest.raises(ApiError) as err:
            requester.request(method, path, **kwargs)
        assert err.value.status_code == status
        if field:
            assert field in [e["field"] for e in err.value.body["errors"]]

    @pytest.mark.parametrize(
        ("change", "field"),
        [
            ({"prices": {"L4": 1e30}}, "prices.L4"),
            ({"machine_id": "m\x00"}, "machine_id"),
            ({"gpus": []}, "gpus"),
            ({"labels": {"Not A Key!": "x"}}, "labels"),
            (
                {
                    "gpus": [
                        {
                            "uuid": "u",
                            "index": 0,
                            "model": "L4",
                            "vram_mb": 1,
                            "compute_capability": "8.9.1",
                        }
                    ]
                },
                "gpus.0.compute_capability",
            ),
        ],
    )
    def test_bad_join_is_422(self, platform, change, field) -> None:  # type: ignore[no-untyped-def]
        body = {
            "token": "t",
            "machine_id": "m",
            "name": "n",
            "gpus": [{"uuid": "u", "index": 0, "model": "L4", "vram_mb": 1}],
            **change,
        }
        response = httpx.post(f"{platform.gateway_url}/v1/providers/join", json=body)
        assert response.status_code == 422
        assert field in [e["field"] for e in response.json()["errors"]]


class TestJobAccess:
    def test_no_token_is_401(self, platform) -> None:  # type: ignore[no-untyped-def]
        response = httpx.get(f"{platform.gateway_url}/v1/jobs")
        assert response.status_code == 401
        assert response.json()["detail"]

    def test_garbage_token_is_401(self, platform) -> None:  # type: ignore[no-untyped-def]
        response = httpx.get(
            f"{platform.gateway_url}/v1/jobs", headers={"Authorization": "Bearer not-a-jwt"}
        )
        assert response.status_code == 401

    def test_someone_elses_job_is_404_everywhere(self, platform, requester: Client) -> None:  # type: ignore[no-untyped-def]
        job = requester.submit(job_spec(["true"]))
        other = new_user(platform)
        for method, suffix in [
            ("GET", ""),
            ("GET", "/logs"),
            ("GET", "/outputs"),
            ("GET", "/events"),
            ("POST", "/cancel"),
        ]:
            with pytest.raises(ApiError) as err:
                other.request(method, f"/v1/jobs/{job.id}{suffix}")
            assert err.value.status_code == 404, suffix
        with pytest.raises(ApiError) as err:
            other.request("GET", "/v1/jobs/not-a-uuid")
        assert err.value.status_code == 404

    def test_provider_role_cannot_submit_jobs(self, platform) -> None:  # type: ignore[no-untyped-def]
        provider = new_user(platform, "provider")
        with pytest.raises(ApiError) as err:
            provider.submit(job_spec(["true"]))
        assert err.value.status_code == 403
