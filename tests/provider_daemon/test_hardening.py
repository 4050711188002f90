"""Strangers' code on the owner's machine: what a job container can and cannot do, with
real containers through podman and the owner's policy from the daemon's config."""

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from docker.types import DeviceRequest

from common.messages import TaskInput
from provider_daemon.containers import Containers, ContainerSpec, gpu_requests
from provider_daemon.policy import (
    NOBODY,
    ContainerPolicy,
    Limits,
    full_reference,
    image_refusal,
    limits_for,
    run_as,
)
from tests.provider_daemon.conftest import FakeGateway, StartDaemon

# /proc/self/status lists capabilities as hex masks; all zero means none at all.
NO_CAPABILITIES = "0000000000000000"


class TestPolicyRules:
    @pytest.mark.parametrize(
        ("image", "reference"),
        [
            ("busybox", "docker.io/library/busybox:latest"),
            ("pytorch/pytorch:2.4", "docker.io/pytorch/pytorch:2.4"),
            ("nvcr.io/nvidia/cuda:12.4.1-base", "nvcr.io/nvidia/cuda:12.4.1-base"),
            ("localhost/gpumarket-sample", "localhost/gpumarket-sample:latest"),
            ("registry:5000/team/app:1", "registry:5000/team/app:1"),
            ("alpine@sha256:" + "a" * 64, "docker.io/library/alpine@sha256:" + "a" * 64),
        ],
    )
    def test_references_are_matched_in_full(self, image: str, reference: str) -> None:
        assert full_reference(image) == reference

    def test_allow_and_deny_lists(self) -> None:
        policy = ContainerPolicy(
            allow_images=["nvcr.io/nvidia/*", "docker.io/pytorch/*"],
            deny_images=["docker.io/pytorch/pytorch:*-devel"],
        )
        assert image_refusal(policy, "nvcr.io/nvidia/cuda:12.4.1-base") is None
        assert image_refusal(policy, "pytorch/pytorch:2.4-runtime") is None
        denied = image_refusal(policy, "pytorch/pytorch:2.4-devel")
        assert denied is not None and "denied" in denied
        stranger = image_refusal(policy, "busybox")
        assert stranger is not None and "docker.io/library/busybox:latest" in stranger
        assert image_refusal(ContainerPolicy(), "anything/at:all") is None

    @pytest.mark.parametrize(
        ("image_user", "allow_root", "expected"),
        [
            ("", False, NOBODY),
            ("root", False, NOBODY),
            ("0", False, NOBODY),
            ("0:0", False, NOBODY),
            # A name could map to uid 0 in the image's own /etc/passwd.
            ("jovyan", False, NOBODY),
            ("1000", False, "1000"),
            ("1000:1000", False, "1000:1000"),
            ("", True, None),
            ("root", True, None),
        ],
    )
    def test_who_the_job_runs_as(
        self, image_user: str, allow_root: bool, expected: str | None
    ) -> None:
        assert run_as(ContainerPolicy(allow_root=allow_root), image_user) == expected

    def test_a_job_gets_its_gpus_share_of_the_machine(self) -> None:
        assert limits_for(1, 4, 32, 131072, 4096) == Limits(cpus=8, memory_mb=32768, pids=4096)
        assert limits_for(4, 4, 32, 131072, 4096) == Limits(cpus=32, memory_mb=131072, pids=4096)
        assert limits_for(1, 2, None, None, 100) == Limits(cpus=None, memory_mb=None, pids=100)


class TestEngineArguments:
    def _spec(self, **fields: object) -> ContainerSpec:
        values: dict[str, object] = {
            "name": "gpumarket-job-1",
            "image": "img",
            "command": ["true"],
            "env": {},
            "labels": {},
            "inputs_dir": Path("/w/in"),
            "outputs_dir": Path("/w/out"),
            "gpu_uuids": ["GPU-aaa", "GPU-bbb"],
            "real_gpus": True,
            "limits": Limits(cpus=2.5, memory_mb=4096, pids=512),
        }
        values.update(fields)
        return ContainerSpec(**values)  # type: ignore[arg-type]

    def _engine(self, engine: str | None) -> Containers:
        # Not through __init__, which would connect to an engine.
        containers = Containers.__new__(Containers)
        containers.engine = engine
        return containers

    def test_every_job_is_hardened_and_limited(self) -> None:
        args = self._engine("Docker 27.3.1").create_arguments(self._spec())
        assert args["cap_drop"] == ["ALL"]
        assert args["security_opt"] == ["no-new-privileges"]
        assert args["privileged"] is False and args["read_only"] is True
        assert args["tmpfs"]["/tmp"].startswith("rw,nosuid,nodev,size=1024m")
        assert args["network_mode"] == "none"
        assert args["user"] == NOBODY
        assert (args["mem_limit"], args["memswap_limit"]) == ("4096m", "4096m")
        assert args["nano_cpus"] == 2_500_000_000 and args["pids_limit"] == 512
        assert args["volumes"] == {
            "/w/in": {"bind": "/inputs", "mode": "ro"},
            "/w/out": {"bind": "/outputs", "mode": "rw"},
        }
        assert "runtime" not in args

    def test_docker_gets_the_nvidia_driver_by_uuid(self) -> None:
        args = self._engine("Docker 27.3.1").create_arguments(self._spec())
        assert args["device_requests"] == [
            DeviceRequest(
                driver="nvidia", device_ids=["GPU-aaa", "GPU-bbb"], capabilities=[["gpu"]]
            )
        ]

    def test_podman_gets_cdi_names(self) -> None:
        args = self._engine("Podman 5.2.0").create_arguments(self._spec())
        assert args["device_requests"] == [
            DeviceRequest(
                driver="cdi", device_ids=["nvidia.com/gpu=GPU-aaa", "nvidia.com/gpu=GPU-bbb"]
            )
        ]
        assert gpu_requests("Podman 4.3.1", ["GPU-x"], ["gpu", "utility"])[0]["Driver"] == "cdi"

    def test_simulated_gpus_get_no_devices(self) -> None:
        args = self._engine("Podman 4.3.1").create_arguments(self._spec(real_gpus=False))
        assert "device_requests" not in args

    def test_egress_runtime_and_root_when_the_owner_allows(self) -> None:
        args = self._engine("Docker 27.3.1").create_arguments(
            self._spec(network=True, runtime="runsc", user=None)
        )
        assert args["network_mode"] == "bridge"
        assert args["runtime"] == "runsc"
        assert "user" not in args


@contextlib.contextmanager
def http_server_on_all_addresses() -> Iterator[int]:
    """A tiny HTTP server a container can reach through its bridge, if it has one."""

    class Hello(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"reached-the-host")

        def log_message(self, *args: object) -> None:
            """Quiet: the test reads the job's answer, not the server's log."""

    server = ThreadingHTTPServer(("0.0.0.0", 0), Hello)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


# Prints "egress-ok" when the job reaches the test's server on the host through its
# default route, "egress-blocked" otherwise.
def _reach_host(port: int) -> str:
    return (
        # The sample image's busybox tools crash now and then in a bare network namespace
        # (ip, awk; wget always, hence HTTP by hand through nc): the shell's complaints go
        # to /dev/null, the probe's answers to stdout.
        "exec 2>/dev/null; "
        "gw=$(ip route | sed -n 's/^default via \\([^ ]*\\).*/\\1/p'); "
        f'if printf "GET / HTTP/1.0\\r\\n\\r\\n" | nc -w 5 "${{gw:-10.88.0.1}}" {port} '
        "| grep -q reached-the-host; "
        "then echo egress-ok; else echo egress-blocked; fi; "
        "ls /sys/class/net | grep -vc '^lo$' | sed 's/^/interfaces=/'"
    )


class TestJobContainers:
    async def test_no_root_no_capabilities_read_only_root(self, start_daemon: StartDaemon) -> None:
        running = await start_daemon()
        script = (
            "echo uid=$(id -u) gid=$(id -g) home=$HOME; "
            "grep -E '^Cap(Eff|Prm|Bnd)' /proc/self/status; "
            "grep NoNewPrivs /proc/self/status; "
            "touch /rootfs-write 2>/dev/null && echo root-writable || echo root-readonly; "
            "echo scratch > /tmp/x && echo tmp-writable; "
            "echo result > /outputs/r.txt && echo outputs-writable; "
            "touch /inputs/x 2>/dev/null && echo inputs-writable || echo inputs-readonly"
        )
        task = running.task_for(["sh", "-c", script])
        await running.send(task)
        finished = await running.finished(task.job_id)
        assert (finished.outcome, finished.exit_code) == ("exited", 0), finished.reason
        lines = running.log_lines(task.job_id)
        assert "uid=65534 gid=65534 home=/tmp" in lines
        for cap in ("CapEff", "CapPrm", "CapBnd"):
            assert f"{cap}:\t{NO_CAPABILITIES}" in lines
        assert "NoNewPrivs:\t1" in lines
        for expected in ("root-readonly", "tmp-writable", "outputs-writable", "inputs-readonly"):
            assert expected in lines
        assert [f.path for f in finished.outputs] == ["r.txt"]

    async def test_a_job_sees_neither_the_host_nor_other_jobs(
        self, start_daemon: StartDaemon, gateway: FakeGateway
    ) -> None:
        running = await start_daemon()
        work_dir = running.config.work_dir
        first = running.task_for(
            ["sh", "-c", "echo secret-of-the-first > /outputs/secret.txt; sleep 6"],
            inputs=[TaskInput(file_id="f1", path="mine.txt")],
        )
        gateway.inputs[first.job_id] = {"mine.txt": b"first job's input\n"}
        await running.send(first)
        await asyncio.sleep(2)  # the first job is running with its files in place
        probe = (
            f"ls {work_dir} 2>/dev/null && echo host-work-dir-visible || echo no-host-work-dir; "
            "find / -path /proc -prune -o -path /sys -prune -o -name secret.txt -print "
            "2>/dev/null | sed 's/^/found:/'; "
            "ls -A /inputs | sed 's/^/input:/'; ls -A /outputs | sed 's/^/output:/'; "
            "cat /etc/hostname /proc/1/cmdline | tr '\\0' ' '; echo; "
            "ls /home /root 2>/dev/null | head -3 | sed 's/^/home:/'; echo probe-done"
        )
        second = running.task_for(
            ["sh", "-c", probe], gpu_uuids=running.gpu_uuids[1:], max_duration_s=60
        )
        await running.send(second)
        finished = await running.finished(second.job_id)
        assert finished.exit_code == 0, finished.reason
        lines = running.log_lines(second.job_id)
        assert "probe-done" in lines
        assert "no-host-work-dir" in lines
        assert not [line for line in lines if line.startswith(("found:", "input:", "output:"))]
        assert (await running.finished(first.job_id)).exit_code == 0

    async def test_no_network_without_egress(self, start_daemon: StartDaemon) -> None:
        running = await start_daemon(policy=ContainerPolicy(network=True))
        with http_server_on_all_addresses() as port:
            closed = running.task_for(["sh", "-c", _reach_host(port)], egress=False)
            await running.send(closed)
            assert (await running.finished(closed.job_id)).exit_code == 0
            assert running.log_lines(closed.job_id) == ["egress-blocked", "interfaces=0"]

            # The same machine, a job that asked for egress: it reaches the host.
            open_ = running.task_for(["sh", "-c", _reach_host(port)], egress=True)
            await running.send(open_)
            assert (await running.finished(open_.job_id)).exit_code == 0
            assert running.log_lines(open_.job_id) == ["egress-ok", "interfaces=1"]

    async def test_egress_is_refused_where_the_owner_allows_no_network(
        self, start_daemon: StartDaemon
    ) -> None:
        running = await start_daemon()
        task = running.task_for(["true"], egress=True)
        await running.send(task)
        await running.all_tasks_handled()
        assert running.types_of(task.job_id) == ["rejected"]
        assert "network" in (running.events_of(task.job_id)[0].reason or "")

    async def test_killed_at_its_memory_limit_with_a_clear_reason(
        self, start_daemon: StartDaemon
    ) -> None:
        # 512 MiB over 2 GPUs: 256 MiB for a one-GPU job.
        running = await start_daemon(memory_mb=512)
        hog = running.task_for(["dd", "if=/dev/zero", "of=/dev/null", "bs=400M", "count=1"])
        within = running.task_for(
            ["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"],
            gpu_uuids=running.gpu_uuids[1:],
        )
        await running.send(hog)
        await running.send(within)
        killed = await running.finished(hog.job_id)
        assert (killed.outcome, killed.exit_code) == ("exited", 137)
        assert killed.reason is not None and "out of memory" in killed.reason
        assert "the job's limit here is 256 MiB" in killed.reason
        fine = await running.finished(within.job_id)
        assert (fine.exit_code, fine.reason) == (0, None)

    async def test_owner_policy_refuses_images(self, start_daemon: StartDaemon) -> None:
        running = await start_daemon(
            policy=ContainerPolicy(deny_images=["localhost/gpumarket-sample:*"])
        )
        task = running.task_for(["true"])
        await running.send(task)
        await running.all_tasks_handled()
        assert running.types_of(task.job_id) == ["rejected"]
        assert "denied by this machine's policy" in (running.events_of(task.job_id)[0].reason or "")

    async def test_an_image_over_the_size_limit_is_the_machines_refusal(
        self, start_daemon: StartDaemon
    ) -> None:
        running = await start_daemon(policy=ContainerPolicy(max_image_gb=0.000_001))
        task = running.task_for(["true"])
        await running.send(task)
        finished = await running.finished(task.job_id)
        assert finished.outcome == "infrastructure"
        assert "this machine takes images up to" in (finished.reason or "")
        assert "started" not in running.types_of(task.job_id)

    async def test_root_when_the_owner_allows_it(self, start_daemon: StartDaemon) -> None:
        running = await start_daemon(policy=ContainerPolicy(allow_root=True))
        task = running.task_for(["sh", "-c", "id -u; grep CapEff /proc/self/status"])
        await running.send(task)
        assert (await running.finished(task.job_id)).exit_code == 0
        # Root in the container, still without any capability.
        assert running.log_lines(task.job_id) == ["0", f"CapEff:\t{NO_CAPABILITIES}"]
