"""The fixtures themselves, against the llama.cpp servers directly (no router): the model file,
the two servers, and the control for the cancellation measurement."""

from __future__ import annotations

from pathlib import Path

import pytest
from e2e_support import require_e2e_backend

require_e2e_backend()  # skips this module locally, fails it in CI, when the backend is missing

import openai  # noqa: E402
from e2e_clients import (  # noqa: E402
    BUSY_CPU_SHARE,
    EMBEDDING_INPUTS,
    SETTLE_LIMIT_SECONDS,
    SHORT_MAX_TOKENS,
    assert_generation_was_cancelled,
    chat,
    complete,
    direct_client,
    embed,
    measure_streamed_cancellation,
    streamed_chat_deltas,
)
from e2e_support import ALPHA, BACKEND_KEY, BETA, ROUTER_TOKEN, Backends  # noqa: E402
from tiny_model import HIDDEN_SIZE, write_tiny_llama_gguf  # noqa: E402

pytestmark = pytest.mark.e2e

MODEL_NAMES = (ALPHA, BETA)


def test_model_file_is_small_deterministic_and_seeded(tmp_path: Path) -> None:
    first, second, other_seed = tmp_path / "1.gguf", tmp_path / "2.gguf", tmp_path / "3.gguf"
    write_tiny_llama_gguf(first)
    write_tiny_llama_gguf(second)
    write_tiny_llama_gguf(other_seed, seed=7)
    assert first.read_bytes() == second.read_bytes()
    assert first.read_bytes() != other_seed.read_bytes()
    assert first.stat().st_size < 1024 * 1024


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_backend_lists_its_model_name(backends: Backends, model_name: str) -> None:
    models = direct_client(backends.by_name(model_name)).models.list()
    assert [model.id for model in models.data] == [model_name]


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_backend_generates_and_embeds(backends: Backends, model_name: str) -> None:
    client = direct_client(backends.by_name(model_name))
    chat_response = chat(client, model_name)
    assert chat_response.choices[0].finish_reason == "length"
    assert chat_response.usage is not None
    assert chat_response.usage.completion_tokens == SHORT_MAX_TOKENS
    assert chat_response.choices[0].message.content
    assert complete(client, model_name).choices[0].finish_reason == "length"
    vectors = embed(client, model_name)
    assert [len(vector) for vector in vectors] == [HIDDEN_SIZE] * len(EMBEDDING_INPUTS)
    assert vectors[0] != vectors[1]


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_backend_streams_the_same_text_it_answers(backends: Backends, model_name: str) -> None:
    client = direct_client(backends.by_name(model_name))
    deltas = streamed_chat_deltas(client, model_name)
    assert len([delta for delta in deltas if delta]) > 1, "expected several content chunks"
    assert "".join(deltas) == chat(client, model_name).choices[0].message.content


def test_backends_answer_differently(backends: Backends) -> None:
    # What lets the router tests tell which backend served a request.
    alpha, beta = direct_client(backends.alpha), direct_client(backends.beta)
    assert chat(alpha, ALPHA).choices[0].message.content != (
        chat(beta, BETA).choices[0].message.content
    )
    assert complete(alpha, ALPHA).choices[0].text != complete(beta, BETA).choices[0].text
    assert embed(alpha, ALPHA) != embed(beta, BETA)


def test_keyed_backend_refuses_any_other_key(backends: Backends) -> None:
    assert backends.alpha.api_key == BACKEND_KEY
    with pytest.raises(openai.AuthenticationError):
        direct_client(backends.alpha, api_key=ROUTER_TOKEN).models.list()


def test_measurement_sees_a_generation_that_goes_on(backends: Backends) -> None:
    """The negative control: a client that merely stops reading, connection open, does not
    stop llama.cpp, and the measurement reports that the CPU time kept growing."""
    client = direct_client(backends.beta)
    figures = measure_streamed_cancellation(client, BETA, backends.beta.pid, drop_connection=False)
    print(figures.describe())
    assert figures.settled_after is None, figures.describe()
    assert figures.cpu_after_disconnect >= BUSY_CPU_SHARE * SETTLE_LIMIT_SECONDS
    # Closing the stream at the end of the measurement stopped it: the backend is free again.
    assert chat(client, BETA).choices[0].finish_reason == "length"


def test_direct_disconnect_stops_generation(backends: Backends) -> None:
    """The control for the router's cancellation test: a client that drops its own connection
    to llama.cpp stops the generation, and the measurement sees it."""
    figures = measure_streamed_cancellation(direct_client(backends.beta), BETA, backends.beta.pid)
    assert_generation_was_cancelled(figures)
    # The backend is free again (a generation still running would hold its lock).
    assert chat(direct_client(backends.beta), BETA).choices[0].finish_reason == "length"
