from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from support import FakeUpstream, Handler, HeldUpstream, RunningRouter


@pytest.fixture
def upstream_factory() -> Iterator[Callable[..., FakeUpstream]]:
    upstreams: list[FakeUpstream] = []

    def make(handler: Handler | None = None, **kwargs: Any) -> FakeUpstream:
        upstream = FakeUpstream(handler, **kwargs)
        upstreams.append(upstream)
        return upstream

    yield make
    for upstream in upstreams:
        upstream.close()


@pytest.fixture
def upstream(upstream_factory: Callable[..., FakeUpstream]) -> FakeUpstream:
    return upstream_factory()


@pytest.fixture
def router_factory() -> Iterator[Callable[..., RunningRouter]]:
    routers: list[RunningRouter] = []

    def make(config: dict[str, Any], **kwargs: Any) -> RunningRouter:
        router = RunningRouter(config, **kwargs)
        routers.append(router)
        return router

    yield make
    for router in routers:
        router.close()


@pytest.fixture
def router(router_factory: Callable[..., RunningRouter], upstream: FakeUpstream) -> RunningRouter:
    """One model, "m", on the default fake upstream; auth off."""
    return router_factory({"models": {"m": {"url": upstream.url}}})


@pytest.fixture
def held_factory() -> Iterator[Callable[[], HeldUpstream]]:
    """Upstreams that answer only when the test lets them (see HeldUpstream)."""
    made: list[HeldUpstream] = []

    def make() -> HeldUpstream:
        upstream = HeldUpstream()
        made.append(upstream)
        return upstream

    yield make
    for upstream in made:
        upstream.close()


@pytest.fixture
def held(held_factory: Callable[[], HeldUpstream]) -> HeldUpstream:
    return held_factory()
