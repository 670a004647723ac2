from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar

import pytest
from support import FakeUpstream, HeldUpstream, RunningRouter


class Closable(Protocol):
    def close(self) -> None: ...


Made = TypeVar("Made", bound=Closable)


def closed_after_the_test(make: Callable[..., Made]) -> Iterator[Callable[..., Made]]:
    """A factory fixture's body: what the test makes is closed when it ends, pass or fail."""
    made: list[Made] = []

    def factory(*args: Any, **kwargs: Any) -> Made:
        item = make(*args, **kwargs)
        made.append(item)
        return item

    yield factory
    for item in made:
        item.close()


@pytest.fixture
def upstream_factory() -> Iterator[Callable[..., FakeUpstream]]:
    yield from closed_after_the_test(FakeUpstream)


@pytest.fixture
def upstream(upstream_factory: Callable[..., FakeUpstream]) -> FakeUpstream:
    return upstream_factory()


@pytest.fixture
def router_factory() -> Iterator[Callable[..., RunningRouter]]:
    yield from closed_after_the_test(RunningRouter)


@pytest.fixture
def router(router_factory: Callable[..., RunningRouter], upstream: FakeUpstream) -> RunningRouter:
    """One model, "m", on the default fake upstream; auth off."""
    return router_factory({"models": {"m": {"url": upstream.url}}})


@pytest.fixture
def held_factory() -> Iterator[Callable[[], HeldUpstream]]:
    """Upstreams that answer only when the test lets them (see HeldUpstream)."""
    yield from closed_after_the_test(HeldUpstream)


@pytest.fixture
def held(held_factory: Callable[[], HeldUpstream]) -> HeldUpstream:
    return held_factory()
