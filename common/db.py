"""The declarative base shared by every service's tables, the engine factory, and rows
passed to a statement as arrays."""

from collections.abc import Mapping, Sequence
from typing import Any

from prometheus_client import Counter
from sqlalchemy import (
    ColumnElement,
    MetaData,
    String,
    Table,
    Update,
    any_,
    bindparam,
    event,
    func,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, Insert, insert
from sqlalchemy.engine import Dialect, ExceptionContext
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.sql.selectable import TableValuedAlias

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


def one_of(column: Any, name: str) -> ColumnElement[bool]:
    """`column = ANY(:name)`: the values (strings) go as one array parameter when the
    statement runs, `{name: [...]}`.

    Not an IN list: that changes the statement's text with its length, so SQLAlchemy
    compiles and asyncpg prepares (and Postgres plans) it again for every size."""
    return column == any_(bindparam(name, type_=ARRAY(String)))


class ArrayRows:
    """Rows given as one array per column, as a derived table named `name` (Postgres
    unnest), for statements built once: the arrays are bound when the statement runs,
    from `params(rows)`.

    Why not a VALUES list or an executemany: a VALUES list changes the statement's text
    with its length, so SQLAlchemy compiles and asyncpg prepares it again for every size;
    an executemany runs once per row, statement triggers included. Arrays keep one text
    whatever the number of rows. Why built once: building a statement and its cache key
    costs more than running it (~0.75 ms for an UPDATE of 20 columns on the 2-core
    machine, BENCHMARKS.md), and the scheduler's batches are a dozen statements each.
    """

    def __init__(self, name: str, **types: Any) -> None:
        self.name = name
        self.columns = tuple(types)
        self.table: TableValuedAlias = (
            func.unnest(
                *(
                    # One dimension: a list value (JSON) is one element, not a sub-array.
                    bindparam(self._param(column), type_=ARRAY(type_, dimensions=1))
                    for column, type_ in types.items()
                )
            )
            .table_valued(*self.columns)
            .render_derived(name=name)
        )

    @classmethod
    def of(cls, table: Table, columns: Sequence[str], name: str = "given") -> "ArrayRows":
        """Rows of these columns of `table`, with the table's own column types."""
        return cls(name, **{c: table.c[c].type for c in columns})

    def params(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
        """The execute parameters for `rows` (dicts with at least the columns as keys)."""
        return {self._param(c): [row[c] for row in rows] for c in self.columns}

    def params_of(self, objects: Sequence[Any]) -> dict[str, list[Any]]:
        """The execute parameters for objects with the columns as attributes (ORM rows,
        dataclasses), without a dict per object first."""
        return {self._param(c): [getattr(o, c) for o in objects] for c in self.columns}

    def _param(self, column: str) -> str:
        return f"{self.name}_{column}"


def insert_rows(table: Table, rows: ArrayRows) -> Insert:
    """INSERT ... SELECT of the rows: one statement and one text for any number of rows."""
    return insert(table).from_select(list(rows.columns), select(rows.table))


def update_rows(table: Table, key: str, rows: ArrayRows) -> Update:
    """UPDATE ... FROM the rows: each (`key` among its columns, unique) sets its other
    columns on the table's row with the same `key`.

    Not an executemany: SQLAlchemy builds and asyncpg sends the parameters row by row,
    and the ORM's flush compares every attribute of every object first."""
    given = rows.table
    return (
        update(table)
        .where(table.c[key] == given.c[key])
        .values({c: given.c[c] for c in rows.columns if c != key})
    )
