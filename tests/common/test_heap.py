"""The collector's settings once a service is up."""

import gc
from collections.abc import Iterator

import pytest

from common.heap import THRESHOLDS, settle_after_startup


@pytest.fixture
def collector() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


def test_what_startup_built_is_out_of_the_collectors_sight(collector: None) -> None:
    built = [{"route": i} for i in range(1_000)]
    settle_after_startup()
    assert gc.get_threshold() == THRESHOLDS
    assert gc.get_freeze_count() >= len(built)
    # A full collection no longer walks them: they are in none of its generations.
    seen = {id(o) for o in gc.get_objects()}
    assert not any(id(o) in seen for o in built)


def test_startup_garbage_is_collected_not_frozen(collector: None) -> None:
    class Node:
        pass

    gc.collect()
    # A reference cycle nothing points at: only the cyclic collector frees it.
    a, b = Node(), Node()
    a.other, b.other = b, a  # type: ignore[attr-defined]
    del a, b
    settle_after_startup()
    assert not any(isinstance(o, Node) for o in gc.get_objects())
