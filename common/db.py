"""The declarative base shared by every service's tables, and the engine factory."""

from prometheus_client import Counter
from sqlalchemy import MetaData, event
from sqlalchemy.engine import Dialect, ExceptionContext
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase

# Stable constraint names, so Alembic migrations can refer to them.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


DB_ERRORS = Counter("gpumarket_db_errors_total", "Errors the database driver raised", ["kind"])
DB_ERROR_KINDS = ("connection", "integrity", "other")
for _kind in DB_ERROR_KINDS:
    DB_ERRORS.labels(_kind)


def _count_error(context: ExceptionContext) -> None:
    if context.is_disconnect or context.connection is None:
        kind = "connection"
    elif isinstance(context.sqlalchemy_exception, IntegrityError):
        kind = "integrity"
    else:
        kind = "other"
    DB_ERRORS.labels(kind).inc()


def _connect_counting_refusals(dialect: Dialect, _: object, cargs: tuple, cparams: dict) -> object:
    # A refused or timed-out connect is an OSError, which never reaches handle_error.
    try:
        return dialect.connect(*cargs, **cparams)
    except dialect.loaded_dbapi.Error:
        raise  # counted by handle_error
    except Exception:
        DB_ERRORS.labels("connection").inc()
        raise


def make_engine(url: str) -> AsyncEngine:
    engine = create_async_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10)
    event.listen(engine.sync_engine, "handle_error", _count_error)
    event.listen(engine.sync_engine, "do_connect", _connect_counting_refusals)
    return engine


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker:
    # expire_on_commit=False: rows are turned into responses after the commit.
    return async_sessionmaker(engine, expire_on_commit=False)


async def check_database(engine: AsyncEngine) -> None:
    """For /healthz: raises if the database does not answer."""
    from sqlalchemy import text

    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
