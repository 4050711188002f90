"""The daemon refuses work on a sick GPU, reports its health in heartbeats, and stops by
itself once the platform no longer accepts its credential."""

import asyncio

import pytest

from provider_daemon.errors import CredentialRejected
from provider_daemon.gpus import SimulatedGpus
from tests.provider_daemon.conftest import FakeGateway, StartDaemon, until


async def test_an_unhealthy_gpu_gets_no_task_and_is_reported(start_daemon: StartDaemon) -> None:
    running = await start_daemon(simulate="A100:2")
    gpus = running.daemon.gpus
    assert isinstance(gpus, SimulatedGpus)
    sick, well = running.gpu_uuids
    gpus.set_fault(sick, "XID 79: GPU has fallen off the bus")

    def reported_sick() -> bool:
        last = running.heartbeats[-1].gpus
        return any(g.uuid == sick and not g.healthy for g in last)

    await until(reported_sick, 10, "an unhealthy GPU in a heartbeat")
    beat = {g.uuid: g for g in running.heartbeats[-1].gpus}
    assert beat[sick].health_reason == "XID 79: GPU has fallen off the bus"
    assert beat[well].healthy and beat[well].health_reason is None

    on_sick = running.task_for(["true"], gpu_uuids=[sick])
    await running.send(on_sick)
    await until(lambda: "rejected" in running.types_of(on_sick.job_id), 30, "rejected")
    assert "XID 79" in (running.events_of(on_sick.job_id)[0].reason or "")

    # Recovered: work is taken again.
    gpus.set_fault(sick, None)
    again = running.task_for(["true"], gpu_uuids=[sick])
    await running.send(again)
    assert (await running.finished(again.job_id)).exit_code == 0


async def test_a_revoked_credential_stops_the_daemon_with_a_clear_error(
    start_daemon: StartDaemon, gateway: FakeGateway
) -> None:
    credential = "gpma_soon-revoked"
    running = await start_daemon(credential=credential, credential_check_s=0.2)
    await asyncio.sleep(0.5)
    assert not running.task.done()
    gateway.revoked.add(credential)
    try:
        with pytest.raises(CredentialRejected, match="no longer accepts"):
            await asyncio.wait_for(running.task, 30)
    finally:
        gateway.revoked.discard(credential)


async def test_a_disabled_owner_pauses_the_daemon_instead_of_stopping_it(
    start_daemon: StartDaemon, gateway: FakeGateway
) -> None:
    credential = "gpma_owner-disabled"
    gateway.owner_disabled.add(credential)
    try:
        running = await start_daemon(credential=credential, credential_check_s=0.2)
        beats = len(running.heartbeats)
        await asyncio.sleep(1.5)
        # Still running and beating: enabling the owner brings the machine straight back.
        assert not running.task.done()
        assert len(running.heartbeats) > beats
    finally:
        gateway.owner_disabled.discard(credential)
