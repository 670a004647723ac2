"""Requests made with the official `openai` client, and the cancellation measurement.

Import only after `require_e2e_backend()`: this module needs openai.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

import openai
from e2e_support import CpuSample, LlamaServer, RouterProcess, cpu_seconds, wait_for_cpu_to_settle

Routing = Literal["body", "path"]
ROUTINGS: tuple[Routing, ...] = ("body", "path")

CLIENT_TIMEOUT = 60.0
# The tiny model never ends by itself (see tiny_model.py): every generation is max_tokens long.
SHORT_MAX_TOKENS = 12
CHAT_MESSAGES: list[openai.types.chat.ChatCompletionMessageParam] = [
    {"role": "system", "content": "You are a tiny test model."},
    {"role": "user", "content": "Tell me about reverse proxies."},
]
COMPLETION_PROMPT = "The router said"
EMBEDDING_INPUTS = ["llmhop routes requests", "to local models"]

# The cancellation measurement (see measure_streamed_cancellation).
# Tens of seconds of generation on these machines: far longer than the test needs.
LONG_MAX_TOKENS = 8000
WARM_UP_CHUNKS = 20
BUSY_OBSERVATION_SECONDS = 0.6
# While generating, the backend keeps about one core busy; insist on a quarter of one.
BUSY_CPU_SHARE = 0.25
QUIET_WINDOW_SECONDS = 0.3
# Quiet: under a tenth of a core over the window (3 ticks of 10 ms): idle, not generating.
QUIET_CPU_SECONDS = 0.1 * QUIET_WINDOW_SECONDS
SETTLE_LIMIT_SECONDS = 1.0


def direct_client(server: LlamaServer, api_key: str | None = None) -> openai.OpenAI:
    """A client talking to a llama.cpp server itself, with its key unless told otherwise."""
    return openai.OpenAI(
        base_url=f"{server.base_url}/v1",
        api_key=api_key or server.api_key or "no-key-needed",
        max_retries=0,
        timeout=CLIENT_TIMEOUT,
    )


def router_client(
    router: RouterProcess, model_name: str, routing: Routing, token: str
) -> openai.OpenAI:
    """A client of the router: plain /v1 (the router reads the body's `model`), or a base URL
    under /route/<model>/ (the router routes on the path and never parses the body)."""
    prefix = "/v1" if routing == "body" else f"/route/{model_name}/v1"
    return openai.OpenAI(
        base_url=f"{router.base_url}{prefix}",
        api_key=token,
        max_retries=0,
        timeout=CLIENT_TIMEOUT,
    )


def chat_request(model_name: str, max_tokens: int = SHORT_MAX_TOKENS) -> dict[str, Any]:
    """The chat request of every test: greedy, so a backend answers it the same each time."""
    return {
        "model": model_name,
        "messages": CHAT_MESSAGES,
        "max_tokens": max_tokens,
        "temperature": 0,
    }


def chat(client: openai.OpenAI, model_name: str) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(**chat_request(model_name))


def streamed_chat_deltas(client: openai.OpenAI, model_name: str) -> list[str]:
    """The content of each streamed chunk, in order (empty ones included)."""
    stream = client.chat.completions.create(**chat_request(model_name), stream=True)
    with stream:
        return [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]


def complete(client: openai.OpenAI, model_name: str) -> openai.types.Completion:
    return client.completions.create(
        model=model_name,
        prompt=COMPLETION_PROMPT,
        max_tokens=SHORT_MAX_TOKENS,
        temperature=0,
    )


def embed(client: openai.OpenAI, model_name: str) -> list[list[float]]:
    response = client.embeddings.create(model=model_name, input=EMBEDDING_INPUTS)
    return [item.embedding for item in sorted(response.data, key=lambda item: item.index)]


@dataclass
class CancellationFigures:
    chunks_before_disconnect: int
    busy_seconds: float  # wall time of the observation while streaming
    busy_cpu_seconds: float  # backend CPU time used during it
    settled_after: float | None  # seconds from the disconnect until the backend went quiet
    cpu_after_disconnect: float  # backend CPU-seconds from the disconnect until then
    cpu_in_quiet_window: float  # backend CPU-seconds during the quiet window that followed

    def describe(self) -> str:
        settled = "never" if self.settled_after is None else f"{self.settled_after:.3f} s"
        return (
            f"streaming: {self.busy_cpu_seconds:.3f} CPU-s in {self.busy_seconds:.3f} s "
            f"({self.busy_cpu_seconds / self.busy_seconds:.0%} of a core) after "
            f"{self.chunks_before_disconnect} chunks; then quiet after "
            f"{settled} ({self.cpu_after_disconnect:.3f} CPU-s until then, "
            f"{self.cpu_in_quiet_window:.3f} CPU-s in the next {QUIET_WINDOW_SECONDS} s)"
        )


def measure_streamed_cancellation(
    client: openai.OpenAI, model_name: str, backend_pid: int, drop_connection: bool = True
) -> CancellationFigures:
    """Start a long streamed generation, watch the backend's CPU time grow while the chunks
    arrive, then drop the connection and measure how soon its CPU time stops growing.

    With `drop_connection=False` the client only stops reading and keeps the connection open
    while the CPU time is watched (the negative control: the generation goes on)."""
    stream = client.chat.completions.create(
        **chat_request(model_name, max_tokens=LONG_MAX_TOKENS), stream=True
    )
    chunks = iter(stream)
    try:
        received = 0
        for _ in range(WARM_UP_CHUNKS):  # the generation is under way once chunks flow
            next(chunks)
            received += 1
        busy_start = CpuSample(time.monotonic(), cpu_seconds(backend_pid))
        while time.monotonic() - busy_start.at < BUSY_OBSERVATION_SECONDS:
            next(chunks)  # keep reading, as a live client would
            received += 1
        busy_end = CpuSample(time.monotonic(), cpu_seconds(backend_pid))
        if drop_connection:
            # Closing an unfinished streamed response closes its connection: the disconnect.
            stream.close()
        stopped_reading = CpuSample(time.monotonic(), cpu_seconds(backend_pid))
        settle = wait_for_cpu_to_settle(
            backend_pid,
            stopped_reading,
            quiet_window=QUIET_WINDOW_SECONDS,
            quiet_cpu=QUIET_CPU_SECONDS,
            limit=SETTLE_LIMIT_SECONDS,
        )
    finally:
        stream.close()
    return CancellationFigures(
        chunks_before_disconnect=received,
        busy_seconds=busy_end.at - busy_start.at,
        busy_cpu_seconds=busy_end.cpu - busy_start.cpu,
        settled_after=settle.settled_after,
        cpu_after_disconnect=settle.cpu_after_disconnect,
        cpu_in_quiet_window=settle.cpu_in_quiet_window,
    )


def assert_generation_was_cancelled(figures: CancellationFigures) -> None:
    print(figures.describe())  # shown with -s, and in the report of a failure
    assert figures.busy_cpu_seconds >= BUSY_CPU_SHARE * figures.busy_seconds, (
        f"the backend was not visibly busy while streaming: {figures.describe()}"
    )
    assert figures.settled_after is not None, (
        f"the backend kept generating after the client disconnected: {figures.describe()}"
    )
    assert figures.settled_after <= SETTLE_LIMIT_SECONDS, figures.describe()
