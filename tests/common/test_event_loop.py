"""common.event_loop: the loop the workers run on."""

import asyncio

import uvloop

from common.event_loop import run_on_uvloop


def test_run_on_uvloop_runs_the_coroutine_on_uvloop_and_returns_its_value() -> None:
    async def which_loop() -> str:
        await asyncio.sleep(0)
        return type(asyncio.get_running_loop()).__module__

    assert run_on_uvloop(which_loop()).startswith("uvloop")


def test_run_on_uvloop_leaves_the_default_policy_alone() -> None:
    async def nothing() -> None:
        return None

    run_on_uvloop(nothing())
    assert not isinstance(asyncio.get_event_loop_policy(), uvloop.EventLoopPolicy)
