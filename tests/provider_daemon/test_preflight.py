"""The machine check against the real podman service, and its verdicts as pure functions."""

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from docker.models.containers import Container

from provider_daemon.containers import LABEL_PREFLIGHT, Containers
from provider_daemon.errors import PreflightError
from provider_daemon.gpus import GpuInfo, Inventory, SimulatedGpus
from provider_daemon.preflight import (
    EngineRefused,
    check_gpu_listing,
    check_machine,
    refusal_error,
    run_check_container,
)

GPU_A = "GPU-5f3c2a1e-8b7d-4c6a-9e0f-1a2b3c4d5e6f"
GPU_B = "GPU-0d9e8f7a-6b5c-4d3e-2f1a-0b9c8d7e6f5a"
LISTING = (
    f"GPU 0: NVIDIA H100 80GB HBM3 (UUID: {GPU_A})\nGPU 1: NVIDIA H100 80GB HBM3 (UUID: {GPU_B})\n"
)


def real_inventory(*uuids: str) -> Inventory:
    gpus = [GpuInfo(i, u, "NVIDIA H100 80GB HBM3", 81559, "9.0") for i, u in enumerate(uuids)]
    return Inventory(gpus=gpus, driver_version="550.54.15", cuda_version="12.4", simulated=False)


class RecordingContainers(Containers):
    """Remembers the check containers it creates, so a test can tell its own from those of
    other test sessions on the same podman storage."""

    def __init__(self, docker_host: str) -> None:
        super().__init__(docker_host)
        self.created: list[str] = []

    async def create_check(
        self, name: str, image: str, command: list[str], gpu_uuids: list[str] | None
    ) -> Container:
        self.created.append(name)
        return await super().create_check(name, image, command, gpu_uuids)

    def existing(self) -> list[Container]:
        return [
            c
            for c in self.client.containers.list(all=True, filters={"label": LABEL_PREFLIGHT})
            if c.name in self.created
        ]


@pytest.fixture
async def containers(podman_service: Any) -> AsyncIterator[RecordingContainers]:
    engine = RecordingContainers(podman_service.docker_host)
    yield engine
    # Whatever the test did, none of its check containers may be left.
    left = engine.existing()
    for container in left:
        container.remove(force=True)
    engine.close()
    assert not left, "the machine check left containers behind"


class TestAgainstPodman:
    async def test_simulated_gpus_pass(
        self, containers: RecordingContainers, sample_image: str
    ) -> None:
        inventory = SimulatedGpus("RTX 4090:2", str(uuid.uuid4())).inventory()
        report = await check_machine(containers, inventory, sample_image)
        assert report.engine.startswith("Podman ")
        assert report.simulated and report.gpus_seen == []
        assert report.image == sample_image
        assert 0 < report.seconds < 60
        assert len(containers.created) == 1

    async def test_check_container_is_hardened_like_a_job(
        self, containers: RecordingContainers, sample_image: str
    ) -> None:
        script = "grep CapEff /proc/self/status; cat /proc/net/dev; ulimit -n"
        run = await run_check_container(containers, sample_image, ["sh", "-c", script], None, 30)
        assert run.exit_code == 0
        assert "CapEff:\t0000000000000000" in run.output  # cap_drop ALL
        assert "lo:" in run.output and "eth0" not in run.output  # network none
        assert run.output.strip().endswith("1024")  # the explicit nofile ulimit

    async def test_image_that_cannot_be_had(self, containers: RecordingContainers) -> None:
        image = f"localhost/gpumarket-no-such-image-{uuid.uuid4().hex[:8]}:latest"
        inventory = SimulatedGpus("RTX 4090:1", str(uuid.uuid4())).inventory()
        with pytest.raises(PreflightError) as caught:
            await check_machine(containers, inventory, image)
        message = str(caught.value)
        assert "could not get the check image" in message
        assert image in message

    async def test_real_gpus_without_the_nvidia_toolkit(
        self, containers: RecordingContainers, sample_image: str
    ) -> None:
        # A real negative: podman here has no NVIDIA hook or CDI spec, and its
        # Docker-compatible API drops the device request, so nvidia-smi is never mounted.
        with pytest.raises(PreflightError) as caught:
            await check_machine(containers, real_inventory(GPU_A, GPU_B), sample_image)
        message = str(caught.value)
        assert "NVIDIA Container Toolkit is missing or not configured for Podman" in message
        assert "nvidia-smi" in message and "executable file not found" in message
        assert "nvidia-container-toolkit" in message and "nvidia-ctk runtime configure" in message
        assert "ignores GPU device requests" in message
        assert len(containers.created) == 1

    async def test_a_hung_check_container_is_killed_at_the_timeout(
        self, containers: RecordingContainers, sample_image: str
    ) -> None:
        began = time.monotonic()
        running = asyncio.ensure_future(
            run_check_container(containers, sample_image, ["sleep", "60"], None, timeout_s=2)
        )
        # While it runs, it is there, recognisable by its label.
        deadline = time.monotonic() + 10
        while not containers.existing():
            assert time.monotonic() < deadline, "the check container never appeared"
            await asyncio.sleep(0.1)
        with pytest.raises(PreflightError, match="did not finish within 2 s and was killed"):
            await running
        assert time.monotonic() - began < 20
        assert len(containers.created) == 1 and not containers.existing()

    async def test_an_engine_that_refuses_to_start_it(
        self, containers: RecordingContainers, sample_image: str
    ) -> None:
        with pytest.raises(EngineRefused) as caught:
            await run_check_container(containers, sample_image, ["/no/such/binary"], None, 30)
        assert caught.value.stage == "starting"
        message = str(refusal_error(caught.value.stage, caught.value.words, "Podman", False))
        assert message.startswith("the container engine (Podman) cannot run containers here")
        assert "/no/such/binary" in message


class TestGpuListing:
    def test_every_gpu_seen(self) -> None:
        assert check_gpu_listing(0, LISTING, [GPU_A, GPU_B]) == [GPU_A, GPU_B]

    def test_mig_devices_are_listed_too(self) -> None:
        mig = "MIG-1a2b3c4d-0000-1111-2222-333344445555"
        out = (
            f"GPU 0: NVIDIA A100-SXM4-80GB (UUID: {GPU_A})\n  MIG 1g.10gb Device 0: (UUID: {mig})\n"
        )
        assert check_gpu_listing(0, out, [GPU_A]) == [GPU_A, mig]

    def test_some_gpus_missing(self) -> None:
        only_a = LISTING.splitlines()[0]
        with pytest.raises(PreflightError) as caught:
            check_gpu_listing(0, only_a, [GPU_A, GPU_B])
        message = str(caught.value)
        assert f"could not see 1 of them ({GPU_B})" in message
        assert "given all 2 GPUs" in message

    def test_nvidia_smi_fails(self) -> None:
        out = (
            "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
            "Make sure that the latest NVIDIA driver is installed and running.\n"
        )
        with pytest.raises(PreflightError) as caught:
            check_gpu_listing(9, out, [GPU_A])
        message = str(caught.value)
        assert "nvidia-smi failed in the check container (exit code 9)" in message
        assert "couldn't communicate with the NVIDIA driver" in message

    def test_nvidia_smi_not_mounted_by_an_entrypoint_shell(self) -> None:
        out = "/opt/nvidia/nvidia_entrypoint.sh: line 67: exec: nvidia-smi: not found\n"
        with pytest.raises(PreflightError, match="NVIDIA Container Toolkit is missing"):
            check_gpu_listing(127, out, [GPU_A], "Docker 27.3.1")


class TestRefusals:
    def test_docker_without_the_toolkit(self) -> None:
        words = 'could not select device driver "nvidia" with capabilities: [[gpu utility]]'
        message = str(refusal_error("starting", words, "Docker 27.3.1", real_gpus=True))
        assert "NVIDIA Container Toolkit is missing or not configured for Docker 27.3.1" in message
        assert words in message
        assert "sudo nvidia-ctk runtime configure --runtime=docker" in message
        assert "Podman" not in message

    def test_crun_without_nvidia_smi(self) -> None:
        words = "crun: executable file `nvidia-smi` not found in $PATH: No such file or directory"
        message = str(refusal_error("starting", words, "Podman 4.9.3", real_gpus=True))
        assert "NVIDIA Container Toolkit is missing" in message

    def test_toolkit_present_but_failing(self) -> None:
        words = (
            "OCI runtime create failed: nvidia-container-cli: device error: "
            f"{GPU_B}: unknown device: unknown"
        )
        message = str(refusal_error("starting", words, "Docker 27.3.1", real_gpus=True))
        assert "NVIDIA Container Toolkit could not give the check container its GPUs" in message
        assert GPU_B in message

    def test_other_refusals_are_the_engines(self) -> None:
        words = "error setting rlimit type 7: operation not permitted"
        message = str(refusal_error("starting", words, "Docker 27.3.1", real_gpus=True))
        assert message.startswith("the container engine (Docker 27.3.1) cannot run containers")
        assert words in message
