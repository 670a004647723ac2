"""llmhop in front of two real llama.cpp servers, driven by the official openai client.

Each backend has its own random weights and answers greedily, so comparing a routed answer with
the same request sent to each backend directly shows which backend served it.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass

import pytest
from e2e_support import require_e2e_backend

require_e2e_backend()  # skips this module locally, fails it in CI, when the backend is missing

import numpy  # noqa: E402
import openai  # noqa: E402
from e2e_clients import (  # noqa: E402
    ROUTINGS,
    SHORT_MAX_TOKENS,
    Routing,
    assert_generation_was_cancelled,
    chat,
    complete,
    direct_client,
    embed,
    measure_streamed_cancellation,
    router_client,
    streamed_chat_deltas,
)
from e2e_support import (  # noqa: E402
    ALPHA,
    ALPHA_WITHOUT_KEY,
    BETA,
    ROUTER_TOKEN,
    Backends,
    RouterProcess,
)

pytestmark = pytest.mark.e2e

MODEL_NAMES = (ALPHA, BETA)
CONFIGURED_MODEL_NAMES = {ALPHA, BETA, ALPHA_WITHOUT_KEY}
ROUTES_AND_MODELS = [(routing, name) for routing in ROUTINGS for name in MODEL_NAMES]


@dataclass
class DirectAnswers:
    """What one backend answers when asked directly: the reference for routed answers."""

    chat: str
    completion: str
    embeddings: list[list[float]]


@pytest.fixture
def client(router_with_auth: RouterProcess, routing: Routing, model_name: str) -> openai.OpenAI:
    """A client of the router, for the test's model by the test's way of routing."""
    return router_client(router_with_auth, model_name, routing, ROUTER_TOKEN)


@pytest.fixture(scope="module")
def direct_answers(backends: Backends) -> dict[str, DirectAnswers]:
    answers: dict[str, DirectAnswers] = {}
    for name in MODEL_NAMES:
        client = direct_client(backends.by_name(name))
        answers[name] = DirectAnswers(
            chat=chat(client, name).choices[0].message.content or "",
            completion=complete(client, name).choices[0].text,
            embeddings=embed(client, name),
        )
    assert answers[ALPHA] != answers[BETA], "the backends must be told apart by their answers"
    return answers


def other_model(name: str) -> str:
    return BETA if name == ALPHA else ALPHA


def test_models_list_names_every_configured_model(router_with_auth: RouterProcess) -> None:
    client = router_client(router_with_auth, ALPHA, "body", ROUTER_TOKEN)
    models = client.models.list().data
    assert {model.id for model in models} == CONFIGURED_MODEL_NAMES
    assert {model.owned_by for model in models} == {"llmhop"}


@pytest.mark.parametrize(("routing", "model_name"), ROUTES_AND_MODELS)
def test_chat_completion_reaches_the_named_backend(
    client: openai.OpenAI,
    direct_answers: dict[str, DirectAnswers],
    model_name: str,
) -> None:
    response = chat(client, model_name)
    assert response.choices[0].finish_reason == "length"
    assert response.usage is not None
    assert response.usage.completion_tokens == SHORT_MAX_TOKENS
    assert response.choices[0].message.content == direct_answers[model_name].chat
    assert response.choices[0].message.content != direct_answers[other_model(model_name)].chat


@pytest.mark.parametrize(("routing", "model_name"), ROUTES_AND_MODELS)
def test_streamed_chat_completion_arrives_in_chunks(
    client: openai.OpenAI,
    direct_answers: dict[str, DirectAnswers],
    model_name: str,
) -> None:
    deltas = streamed_chat_deltas(client, model_name)
    assert len([delta for delta in deltas if delta]) > 1, "expected several content chunks"
    assert "".join(deltas) == direct_answers[model_name].chat


@pytest.mark.parametrize(("routing", "model_name"), ROUTES_AND_MODELS)
def test_completion_reaches_the_named_backend(
    client: openai.OpenAI,
    direct_answers: dict[str, DirectAnswers],
    model_name: str,
) -> None:
    text = complete(client, model_name).choices[0].text
    assert text == direct_answers[model_name].completion
    assert text != direct_answers[other_model(model_name)].completion


@pytest.mark.parametrize(("routing", "model_name"), ROUTES_AND_MODELS)
def test_embeddings_reach_the_named_backend(
    client: openai.OpenAI,
    direct_answers: dict[str, DirectAnswers],
    model_name: str,
) -> None:
    vectors = embed(client, model_name)
    assert numpy.allclose(vectors, direct_answers[model_name].embeddings)
    assert not numpy.allclose(vectors, direct_answers[other_model(model_name)].embeddings)


def assert_router_error(error: openai.APIStatusError, status: int) -> None:
    """The router's own errors are OpenAI-shaped: {"error": {"message", "type", "code"}}."""
    assert error.status_code == status
    body = error.response.json()
    assert set(body) == {"error"}
    assert {"message", "type", "code"} <= set(body["error"])
    assert isinstance(body["error"]["message"], str)
    assert body["error"]["message"]


@pytest.mark.parametrize("routing", ROUTINGS)
def test_wrong_router_token_is_refused(router_with_auth: RouterProcess, routing: Routing) -> None:
    client = router_client(router_with_auth, ALPHA, routing, "not-the-router-token")
    with pytest.raises(openai.AuthenticationError) as refused:
        chat(client, ALPHA)
    assert_router_error(refused.value, 401)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_missing_router_token_is_refused(router_with_auth: RouterProcess) -> None:
    # The openai client always sends a token, so this one goes without a client.
    request = urllib.request.Request(
        f"{router_with_auth.base_url}/v1/chat/completions",
        data=json.dumps({"model": ALPHA, "messages": []}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 401
    error = json.loads(refused.value.read())["error"]
    assert {"message", "type", "code"} <= set(error)


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_without_router_auth_any_client_token_goes_through(
    router_without_auth: RouterProcess, direct_answers: dict[str, DirectAnswers], model_name: str
) -> None:
    client = router_client(router_without_auth, model_name, "body", "whatever-the-client-has")
    assert chat(client, model_name).choices[0].message.content == direct_answers[model_name].chat


def test_router_injects_the_backend_key(
    backends: Backends, router_with_auth: RouterProcess, direct_answers: dict[str, DirectAnswers]
) -> None:
    # The client holds only the router's token, which alpha itself refuses...
    with pytest.raises(openai.AuthenticationError):
        chat(direct_client(backends.alpha, api_key=ROUTER_TOKEN), ALPHA)
    # ...yet through the router alpha answers, because the router sends alpha's own key;
    routed = chat(router_client(router_with_auth, ALPHA, "path", ROUTER_TOKEN), ALPHA)
    assert routed.choices[0].message.content == direct_answers[ALPHA].chat
    # and the same server configured without that header refuses: the key came from the router.
    for routing in ROUTINGS:
        client = router_client(router_with_auth, ALPHA_WITHOUT_KEY, routing, ROUTER_TOKEN)
        with pytest.raises(openai.AuthenticationError) as refused:
            chat(client, ALPHA_WITHOUT_KEY)
        # llama-cpp-python's own refusal, passed through untouched (not the router's shape).
        assert "error" not in refused.value.response.json()


@pytest.mark.parametrize("routing", ROUTINGS)
def test_unknown_model_is_not_found(router_with_auth: RouterProcess, routing: Routing) -> None:
    client = router_client(router_with_auth, "no-such-model", routing, ROUTER_TOKEN)
    with pytest.raises(openai.NotFoundError) as not_found:
        chat(client, "no-such-model")
    assert_router_error(not_found.value, 404)


def test_client_disconnect_through_router_stops_generation(
    backends: Backends, router_with_auth: RouterProcess
) -> None:
    """A client that drops its connection to the router mid-stream stops llama.cpp: the router
    must close its upstream connection at once (the direct control is in test_e2e_backend)."""
    client = router_client(router_with_auth, BETA, "body", ROUTER_TOKEN)
    figures = measure_streamed_cancellation(client, BETA, backends.beta.pid)
    assert_generation_was_cancelled(figures)
    # The backend is free again (a generation still running would hold its lock).
    assert chat(client, BETA).choices[0].finish_reason == "length"
