"""Fixtures of the real end-to-end suite: two llama.cpp servers and llmhop routers in front.

Everything is session-scoped: a llama.cpp server takes a few seconds to start, and the tests
never change the servers' state (each request is independent and greedy-decoded).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_support import (
    ALPHA,
    ALPHA_WITHOUT_KEY,
    BACKEND_KEY,
    BETA,
    MODEL_SEEDS,
    ROUTER_TOKEN,
    Backends,
    LlamaServer,
    RouterProcess,
    missing_backend_reason,
    start_llama_server,
    start_router,
)


@pytest.fixture(scope="session")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    # Imported here: collecting the suite must work without gguf (it then skips or fails).
    from tiny_model import write_tiny_llama_gguf

    directory = tmp_path_factory.mktemp("models")
    paths: dict[str, Path] = {}
    for model_name, seed in MODEL_SEEDS.items():
        paths[model_name] = directory / f"{model_name}.gguf"
        write_tiny_llama_gguf(paths[model_name], seed=seed)
    return paths


@pytest.fixture(scope="session")
def backends(
    model_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Backends]:
    reason = missing_backend_reason()
    if reason is not None:  # only reachable when a test module forgot require_e2e_backend()
        pytest.fail(reason, False)
    log_dir = tmp_path_factory.mktemp("backend-logs")
    started: list[LlamaServer] = []
    try:
        started.append(start_llama_server(model_files[ALPHA], ALPHA, log_dir, BACKEND_KEY))
        started.append(start_llama_server(model_files[BETA], BETA, log_dir))
        yield Backends(*started)
    finally:
        for server in started:
            server.managed.stop()


def router_config(backends: Backends, auth_tokens: list[str] | None) -> dict[str, object]:
    injected_key = {"Authorization": f"Bearer {BACKEND_KEY}"}
    config: dict[str, object] = {
        "host": "127.0.0.1",
        "port": 0,
        "models": {
            ALPHA: {"url": backends.alpha.base_url, "headers": injected_key},
            BETA: {"url": backends.beta.base_url},
            ALPHA_WITHOUT_KEY: {"url": backends.alpha.base_url},
        },
    }
    if auth_tokens is not None:
        config["authTokens"] = auth_tokens
    return config


def running_router(
    backends: Backends, auth_tokens: list[str] | None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RouterProcess]:
    router = start_router(router_config(backends, auth_tokens), tmp_path_factory.mktemp("router"))
    try:
        yield router
    finally:
        router.managed.stop()


@pytest.fixture(scope="session")
def router_with_auth(
    backends: Backends, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RouterProcess]:
    yield from running_router(backends, [ROUTER_TOKEN], tmp_path_factory)


@pytest.fixture(scope="session")
def router_without_auth(
    backends: Backends, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RouterProcess]:
    yield from running_router(backends, None, tmp_path_factory)
