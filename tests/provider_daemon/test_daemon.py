"""The daemon end to end against a real nats-server (JetStream) and real podman."""

import asyncio
import hashlib
import logging
from pathlib import Path

import docker
import httpx
import nats
import pytest

from common.messages import TaskCancel, TaskInput
from common.streams import ensure_streams
from gpumarket.localstack.nats import start_nats
from provider_daemon.containers import LABEL_PROVIDER
from tests.provider_daemon.conftest import FakeGateway, StartDaemon, until

SAMPLE = "localhost/gpumarket-sample:latest"


class TestJobRuns:
    async def test_inputs_in_outputs_out_with_events_and_logs(
        self, start_daemon: StartDaemon, gateway: FakeGateway
    ) -> None:
        running = await start_daemon()
        script = (
            "cat /inputs/data/words.txt; "
            "sha256sum /inputs/data/words.txt > /outputs/sum.txt; "
            "mkdir -p /outputs/nested && echo done > /outputs/nested/flag.txt; "
            'echo "job=$GPUMARKET_JOB_ID gpus=$NVIDIA_VISIBLE_DEVICES greeting=$GREETING"; '
            "echo to-stderr >&2; "
            "touch /inputs/forbidden 2>/dev/null && echo inputs-writable || echo inputs-readonly"
        )
        task = running.task_for(
            ["sh", "-c", script],
            env={"GREETING": "hi", "NVIDIA_VISIBLE_DEVICES": "all"},
            inputs=[TaskInput(file_id="f1", path="data/words.txt")],
        )
        words = b"alpha\nbeta\n"
        gateway.inputs[task.job_id] = {"data/words.txt": words}
        await running.send(task)

        finished = await running.finished(task.job_id)
        assert running.types_of(task.job_id) == ["accepted", "started", "exited", "finished"]
        assert (finished.outcome, finished.exit_code) == ("exited", 0)
        assert finished.provider_id == running.provider_id

        expected_sum = hashlib.sha256(words).hexdigest()
        uploaded = {
            path: body
            for (job_id, attempt, path), body in gateway.uploads.items()
            if job_id == task.job_id and attempt == 1
        }
        assert uploaded["sum.txt"].decode().split()[0] == expected_sum
        assert uploaded["nested/flag.txt"] == b"done\n"
        assert gateway.upload_lengths[(task.job_id, 1, "sum.txt")] == str(len(uploaded["sum.txt"]))
        manifest = {f.path: f for f in finished.outputs}
        assert set(manifest) == {"sum.txt", "nested/flag.txt"}
        for path, body in uploaded.items():
            assert manifest[path].sha256 == hashlib.sha256(body).hexdigest()
            assert manifest[path].size == len(body)
        assert gateway.manifests[(task.job_id, 1)] == [f.model_dump() for f in finished.outputs]

        gpu = running.gpu_uuids[0]
        expected_line = f"job={task.job_id} gpus={gpu} greeting=hi"
        await until(lambda: expected_line in running.log_lines(task.job_id), 10, "log lines")
        lines = running.log_lines(task.job_id)
        assert lines[:2] == ["alpha", "beta"]
        assert "to-stderr" in lines and "inputs-readonly" in lines
        assert expected_line in (finished.log_tail or "")
        assert expected_line.encode() in gateway.logs[(task.job_id, 1)]
        assert not (running.config.work_dir / "jobs" / f"{task.job_id}-1").exists()

    async def test_non_zero_exit(self, start_daemon: StartDaemon) -> None:
        running = await start_daemon()
        task = running.task_for(["sh", "-c", "echo about to fail; echo oops >&2; exit 3"])
        await running.send(task)
        finished = await running.finished(task.job_id)
        assert (finished.outcome, finished.exit_code) == ("exited", 3)
        assert finished.log_tail == "about to fail\noops"
        assert running.types_of(task.job_id) == ["accepted", "started", "exited", "finished"]

    async def test_command_that_does_not_exist_is_the_users_error(
        self, start_daemon: StartDaemon
    ) -> None:
        running = await start_daemon()
        task = running.task_for(["/no/such/program"])
        await running.send(task)
        finished = await running.finished(task.job_id)
        assert finished.outcome == "exited"
        assert finished.exit_code in (126, 127)

    async def test_timeout(self, start_daemon: StartDaemon) -> None:
        running = await start_daemon()
        task = running.task_for(["sh", "-c", "echo started; sleep 60"], max_duration_s=2)
        await running.send(task)
        finished = await running.finished(task.job_id)
        assert finished.outcome == "timed_out"
        assert finished.exit_code != 0
        assert "2 s" in (finished.reason or "")
        assert finished.log_tail == "started"

    async def test_cancel(self, start_daemon: StartDaemon) -> None:
        running = await start_daemon()
        task = running.task_for(["sleep", "60"])
        await running.send(task)
        await until(lambda: "started" in running.types_of(task.job_id), 30, "started")
        await running.send(TaskCancel(job_id=task.job_id, attempt=task.attempt))
        finished = await running.finished(task.job_id, within=20)
        assert finished.outcome == "cancelled"
        assert running.types_of(task.job_id) == ["accepted", "started", "exited", "finished"]

    async def test_cancel_before_the_task_arrives(self, start_daemon: StartDaemon) -> None:
        """The platform frees the GPUs of a task that never reached the machine only when
        the daemon says it never ran; the task, arriving late, must not run either."""
        running = await start_daemon()
        task = running.task_for(["sh", "-c", "echo ran"])
        await running.send(TaskCancel(job_id=task.job_id, attempt=task.attempt))
        finished = await running.finished(task.job_id, within=20)
        assert finished.outcome == "cancelled"
        await running.send(task)
        await running.all_tasks_handled()
        await asyncio.sleep(0.5)
        assert running.types_of(task.job_id) == ["finished"]
        assert running.log_lines(task.job_id) == []

    async def test_redelivered_assignment_is_ignored(self, start_daemon: StartDaemon) -> None:
        running = await start_daemon()
        task = running.task_for(["sh", "-c", "sleep 1; echo once"])
        # Twice while it runs, then once more after it finished.
        await running.send(task)
        await running.send(task)
        await running.finished(task.job_id)
        await running.send(task)
        await running.all_tasks_handled()
        await asyncio.sleep(0.5)
        assert running.types_of(task.job_id) == ["accepted", "started", "exited", "finished"]
        assert running.log_lines(task.job_id).count("once") == 1

    async def test_missing_image_is_an_infrastructure_failure(
        self, start_daemon: StartDaemon
    ) -> None:
        running = await start_daemon()
        task = running.task_for(["true"], image="localhost/gpumarket-missing:nope")
        await running.send(task)
        finished = await running.finished(task.job_id)
        assert running.types_of(task.job_id) == ["accepted", "finished"]
        assert finished.outcome == "infrastructure"
        assert finished.exit_code is None
        assert "localhost/gpumarket-missing:nope" in (finished.reason or "")

    async def test_failing_input_download_is_an_infrastructure_failure(
        self, start_daemon: StartDaemon, gateway: FakeGateway
    ) -> None:
        running = await start_daemon()
        task = running.task_for(["true"], inputs=[TaskInput(file_id="f", path="../escape")])
        gateway.inputs[task.job_id] = {"../escape": b"x"}
        await running.send(task)
        finished = await running.finished(task.job_id)
        assert finished.outcome == "infrastructure"
        assert "not a safe relative path" in (finished.reason or "")


class TestFleetBehaviour:
    async def test_two_jobs_at_once_on_their_own_gpus(self, start_daemon: StartDaemon) -> None:
        running = await start_daemon()
        gpu_a, gpu_b = running.gpu_uuids
        first = running.task_for(["sh", "-c", "sleep 2; echo $NVIDIA_VISIBLE_DEVICES"])
        second = running.task_for(
            ["sh", "-c", "sleep 2; echo $NVIDIA_VISIBLE_DEVICES"], gpu_uuids=[gpu_b]
        )
        await running.send(first)
        await running.send(second)
        await until(
            lambda: all("started" in running.types_of(t.job_id) for t in (first, second)),
            30,
            "both started",
        )
        # Both run at the same time, and the heartbeat says so.
        await until(
            lambda: (
                bool(running.heartbeats)
                and set(running.heartbeats[-1].running_jobs) == {first.job_id, second.job_id}
            ),
            10,
            "heartbeat with both jobs",
        )
        beat = running.heartbeats[-1]
        assert {m.uuid for m in beat.gpus} == {gpu_a, gpu_b}
        assert all((m.utilization_pct or 0) >= 80 for m in beat.gpus)
        for task, gpu in ((first, gpu_a), (second, gpu_b)):
            finished = await running.finished(task.job_id)
            assert (finished.outcome, finished.log_tail) == ("exited", gpu)
        await until(lambda: running.heartbeats[-1].running_jobs == [], 10, "idle heartbeat")

    async def test_busy_or_unknown_gpu_is_rejected(self, start_daemon: StartDaemon) -> None:
        running = await start_daemon()
        first = running.task_for(["sleep", "60"])
        await running.send(first)
        await until(lambda: "accepted" in running.types_of(first.job_id), 30, "accepted")
        same_gpu = running.task_for(["true"])
        unknown = running.task_for(["true"], gpu_uuids=["GPU-not-here"])
        await running.send(same_gpu)
        await running.send(unknown)
        await until(lambda: "rejected" in running.types_of(unknown.job_id), 30, "rejected")
        await until(lambda: "rejected" in running.types_of(same_gpu.job_id), 30, "rejected")
        assert running.types_of(same_gpu.job_id) == ["rejected"]
        assert "already in use" in (running.events_of(same_gpu.job_id)[0].reason or "")
        await running.send(TaskCancel(job_id=first.job_id, attempt=1))
        assert (await running.finished(first.job_id)).outcome == "cancelled"

    async def test_shutdown_stops_and_reports_running_jobs(
        self, start_daemon: StartDaemon, docker_client: docker.DockerClient
    ) -> None:
        running = await start_daemon()
        task = running.task_for(["sleep", "60"])
        await running.send(task)
        await until(lambda: "started" in running.types_of(task.job_id), 30, "started")
        await running.stop()
        finished = next(e for e in running.events_of(task.job_id) if e.type == "finished")
        assert finished.outcome == "infrastructure"
        assert finished.reason == "provider daemon stopped"
        left = docker_client.containers.list(
            all=True, filters={"label": f"{LABEL_PROVIDER}={running.provider_id}"}
        )
        assert left == []

    async def test_metrics_and_health(self, start_daemon: StartDaemon) -> None:
        from gpumarket.localstack.process import free_port

        port = free_port()
        running = await start_daemon(metrics_port=port)
        task = running.task_for(["true"])
        await running.send(task)
        await running.finished(task.job_id)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            health = await client.get("/healthz")
            assert health.status_code == 200
            assert health.json()["nats"] == "connected"
            body = (await client.get("/metrics/")).text
        assert 'provider_daemon_tasks_total{outcome="exited"}' in body
        assert "provider_daemon_running_tasks" in body
        gpu = running.gpu_uuids[0]
        assert f'provider_daemon_gpu_utilization_pct{{uuid="{gpu}"}}' in body


class TestNatsOutage:
    async def test_daemon_rides_out_a_nats_restart(
        self,
        start_daemon: StartDaemon,
        tmp_path: Path,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        # A NATS server of its own, so restarting it disturbs no other test.
        server = await asyncio.to_thread(start_nats, tmp_path / "nats")
        client = await nats.connect(
            server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2, error_cb=_quiet
        )
        try:
            await ensure_streams(client.jetstream())
            running = await start_daemon(nats_client=client, reconnect_wait_s=0.2)
            await asyncio.to_thread(server.stop)
            await until(lambda: "NATS connection lost" in caplog.text, 10, "outage logged")
            await asyncio.sleep(1)
            server = await asyncio.to_thread(start_nats, tmp_path / "nats", server.port)
            await until(lambda: "NATS reconnected" in caplog.text, 20, "reconnect logged")
            await until(lambda: client.is_connected, 20, "test client reconnected")
            # The outage is one line, not one per failed attempt, and without a traceback.
            outage = [
                r
                for r in caplog.records
                if r.name == "provider_daemon.daemon" and r.levelno >= logging.WARNING
            ]
            (line,) = [r.getMessage() for r in outage]
            assert line.startswith("NATS connection lost (") and line.endswith("); reconnecting")
            assert all(r.exc_info is None for r in caplog.records)

            task = running.task_for(["echo", "after the outage"])
            await running.send(task)
            finished = await running.finished(task.job_id, within=60)
            assert (finished.outcome, finished.log_tail) == ("exited", "after the outage")
            await running.stop()
        finally:
            await client.close()
            await asyncio.to_thread(server.stop)


async def _quiet(_: Exception) -> None:
    """The test's own client: its reconnect attempts are not the daemon's log lines."""
