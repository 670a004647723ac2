"""What the router gets to watch each worker, evaluated: the health path its units wait for
(probed every healthInterval seconds) and its metrics path (merged into the router's
/metrics), for each backend and runtime, with the flag that turns a server's metrics on;
neither for a model on demand, whose probes and scrapes would start it or keep it loaded; the
user's own values and `null` winning, and the metrics flag written false or null turning them
off."""

from __future__ import annotations

import shlex
from typing import Any

import pytest
from module_configs import (
    WATCHED,
    argv,
    config_file,
    container,
    llmhop,
    router_check,
    warnings,
)
from nix_harness import evaluate

pytestmark = [pytest.mark.nix, pytest.mark.usefixtures("nix_inputs")]

# Each backend's model `m` on a port, its URL, and the flag turning its metrics on (None: the
# server always serves them).
BACKENDS = {
    "llama-cpp": ({"port": 18001}, "http://127.0.0.1:18001", "--metrics"),
    "vllm": ({"port": 20001, "model": "org/m"}, "http://127.0.0.1:20001", None),
    "sglang": ({"port": 30001, "model": "org/m"}, "http://127.0.0.1:30001", "--enable-metrics"),
}
RUNTIMES = ["native", "container"]


def one_model(backend: str, runtime: str, **model: Any) -> dict[str, Any]:
    options: dict[str, Any] = {"runtime": runtime, "models": {"m": BACKENDS[backend][0] | model}}
    if backend == "sglang":
        options["package"] = "/opt/sglang"
    return llmhop(**{backend: options})


def server_flags(result: dict[str, Any], backend: str, runtime: str) -> list[str]:
    """The flags the server of `m` is started with."""
    unit = f"{backend}-m"
    if runtime == "native":
        words = argv(result, unit)
        return words[words.index("--") + 2 :]
    return shlex.split(container(result, unit)["Container"]["Exec"][0])


def readiness_path(result: dict[str, Any], backend: str, runtime: str) -> str:
    """The path the unit waits on before it is active."""
    unit = f"{backend}-m"
    if runtime == "native":
        words = argv(result, unit)
        return words[words.index("-health-path") + 1]
    [check] = container(result, unit)["Container"]["HealthCmd"]
    return "/" + check.split("://", 1)[1].split("/", 1)[1]


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_worker_that_is_always_on_is_probed_and_scraped(backend: str, runtime: str) -> None:
    result = evaluate(one_model(backend, runtime))
    url, flag = BACKENDS[backend][1:]
    assert config_file(result)["models"] == {"m": {"url": url, **WATCHED}}
    # One health path: the router probes the one the unit waits for.
    assert readiness_path(result, backend, runtime) == WATCHED["healthPath"]
    metrics_flags = [f for f in server_flags(result, backend, runtime) if "metrics" in f]
    assert metrics_flags == ([flag] if flag else [])
    check = router_check(result)
    assert check.returncode == 0, check.stderr


def test_models_on_demand_are_neither_probed_nor_scraped() -> None:
    on_demand = {"enable": True, "idleTimeout": "2min"}
    config = llmhop(
        **{
            "llama-cpp": {
                "models": {
                    "grouped": {"onDemand": on_demand, "group": "gpu"},
                    "alone": {"onDemand": on_demand},
                    "always": {},
                }
            },
            "sglang": {
                "runtime": "native",
                "package": "/opt/sglang",
                "models": {
                    "s": {
                        "port": 30001,
                        "model": "org/s",
                        "onDemand": {"enable": True, "workerPort": 30101},
                    }
                },
            },
        }
    )
    result = evaluate(config)
    routes = config_file(result)["models"]
    watched = {name: sorted(set(route) & set(WATCHED)) for name, route in routes.items()}
    assert watched == {
        "grouped": [],
        "alone": [],
        "s": [],
        "always": ["healthPath", "metricsPath"],
    }
    assert routes["alone"]["upstreamIdleTimeout"] == 30
    # Their servers still serve metrics, for a scraper of the user's own.
    assert "--metrics" in argv(result, "llama-cpp-alone")
    assert "--enable-metrics" in argv(result, "sglang-s")
    # A probe of a model in a group is what the router refuses.
    check = router_check(result)
    assert check.returncode == 0, check.stderr


def test_the_users_own_paths_win_and_null_drops_them() -> None:
    config = one_model("llama-cpp", "native")
    config["services"]["llmhop"]["settings"] = {
        "models": {"m": {"healthPath": "/v1/models", "metricsPath": None, "healthInterval": 60}}
    }
    result = evaluate(config)
    assert config_file(result)["models"]["m"] == {
        "url": "http://127.0.0.1:18001",
        "healthPath": "/v1/models",
        "healthInterval": 60,
    }
    # The unit still waits on the server's own health path.
    assert readiness_path(result, "llama-cpp", "native") == "/health"
    config["services"]["llmhop"]["settings"]["models"]["m"] = {"healthPath": None}
    assert config_file(evaluate(config))["models"]["m"] == {
        "url": "http://127.0.0.1:18001",
        "metricsPath": "/metrics",
    }


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize(
    ("backend", "where", "value"),
    [
        ("llama-cpp", "settings", False),
        ("llama-cpp", "settings", None),
        ("llama-cpp", "modelSettings", False),
        ("sglang", "settings", False),
        ("sglang", "modelSettings", None),
    ],
)
def test_metrics_written_off_are_off(
    backend: str, runtime: str, where: str, value: bool | None
) -> None:
    flag = BACKENDS[backend][2]
    assert flag is not None
    config = one_model(backend, runtime)
    written = {flag.removeprefix("--"): value}
    options = config["services"]["llmhop"][backend]
    if where == "settings":
        options["models"]["m"]["settings"] = written
    else:
        options["modelSettings"] = written
    result = evaluate(config)
    # Neither the flag nor its negation: llama-server has no --no-metrics.
    assert [f for f in server_flags(result, backend, runtime) if "metrics" in f] == []
    assert config_file(result)["models"]["m"] == {
        "url": BACKENDS[backend][1],
        "healthPath": "/health",
    }


def test_a_probe_written_for_a_model_on_demand_is_warned_about() -> None:
    config = llmhop(**{"llama-cpp": {"models": {"m": {"onDemand": {"enable": True}}}}})
    config["services"]["llmhop"]["settings"] = {
        "models": {"m": {"healthPath": "/health", "metricsPath": "/metrics"}}
    }
    assert warnings(config) == [
        "services.llmhop.llama-cpp.models.m is on demand, but the router probes it every"
        " healthInterval seconds (services.llmhop.settings.models.m.healthPath): each time"
        " starts it, and keeps it loaded past onDemand.idleTimeout. Leave healthPath unset"
        " for it.",
        "services.llmhop.llama-cpp.models.m is on demand, but the router asks it for its"
        " metrics at every scrape of its /metrics"
        " (services.llmhop.settings.models.m.metricsPath): each time starts it, and keeps it"
        " loaded past onDemand.idleTimeout. Leave metricsPath unset for it.",
    ]
    del config["services"]["llmhop"]["settings"]
    assert warnings(config) == []
