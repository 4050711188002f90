"""The database and NATS error counters every service exports, against the real servers."""

import asyncio
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, IntegrityError

from common.db import make_engine
from common.nats_client import connect_nats
from gpumarket.localstack.nats import start_nats
from gpumarket.localstack.process import free_port


def count(name: str, kind: str) -> float:
    return REGISTRY.get_sample_value(name, {"kind": kind}) or 0.0


async def test_database_errors_are_counted_by_kind(unit_database_url: str) -> None:
    engine = make_engine(unit_database_url)
    before = {k: count("gpumarket_db_errors_total", k) for k in ("integrity", "other")}
    try:
        async with engine.begin() as conn:
            await conn.execute(text("CREATE TEMP TABLE t (id int PRIMARY KEY)"))
            await conn.execute(text("INSERT INTO t VALUES (1)"))
            with pytest.raises(IntegrityError):
                async with conn.begin_nested():
                    await conn.execute(text("INSERT INTO t VALUES (1)"))
            with pytest.raises(DBAPIError):
                async with conn.begin_nested():
                    await conn.execute(text("SELECT no_such_column FROM t"))
    finally:
        await engine.dispose()
    assert count("gpumarket_db_errors_total", "integrity") == before["integrity"] + 1
    assert count("gpumarket_db_errors_total", "other") == before["other"] + 1


async def test_an_unreachable_database_is_a_connection_error() -> None:
    engine = make_engine(f"postgresql+asyncpg://nobody@127.0.0.1:{free_port()}/none")
    before = count("gpumarket_db_errors_total", "connection")
    try:
        with pytest.raises(OSError):
            async with engine.connect():
                pass
    finally:
        await engine.dispose()
    assert count("gpumarket_db_errors_total", "connection") == before + 1


async def test_a_lost_nats_server_is_counted(tmp_path: Path) -> None:
    server = await asyncio.to_thread(start_nats, tmp_path / "nats")
    before = count("gpumarket_nats_errors_total", "disconnect")
    nc = await connect_nats(server.url, "test", reconnect_time_wait=0.1)
    try:
        server.stop()
        for _ in range(100):
            if count("gpumarket_nats_errors_total", "disconnect") > before:
                break
            await asyncio.sleep(0.05)
        assert count("gpumarket_nats_errors_total", "disconnect") == before + 1
    finally:
        await nc.close()
