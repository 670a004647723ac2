"""What `nixos-rebuild switch` does to each kind of unit the module renders, by
switch-to-configuration-ng's rules (switch_model.py), with every unit active beforehand (the
on-demand workers loaded): the rendered system and user units, and the container units as
Podman's Quadlet generator makes them, before and after a change. docs/module.md's table
"What `nixos-rebuild switch` does" says the same.

Rootless units are judged by the same rules in their user's manager, as the locked nixpkgs'
switch-to-configuration-ng restarts changed units under /etc/systemd/user, where quadlet-nix
installs the generated ones.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from module_configs import llmhop
from nix_harness import REPO, evaluate
from quadlet_generator import Generated, generate
from switch_model import LEFT_ALONE, plan

pytestmark = [pytest.mark.nix, pytest.mark.usefixtures("nix_inputs")]

MODULE_MD = REPO / "docs" / "module.md"

# Each kind of unit (as docs/module.md's table names it) and its unit in `configuration`.
KINDS = {
    "native worker": ("system", "llama-cpp-a.service"),
    "native worker on demand": ("system", "llama-cpp-b.service"),
    "rootful container": ("system", "llama-cpp-c.service"),
    "rootful container on demand": ("system", "llama-cpp-d.service"),
    "rootless container": ("user", "vllm-e.service"),
    "rootless container on demand": ("user", "vllm-f.service"),
    "proxy": ("system", "llama-cpp-b-proxy.service"),
    "rootless proxy": ("user", "vllm-f-proxy.service"),
    "socket": ("system", "llama-cpp-b-proxy.socket"),
    "router": ("system", "llmhop.service"),
}


def configuration(*, engine: str, idle: str, port: int) -> dict[str, Any]:
    """llama.cpp natively (`a`, and `b` on demand) and in rootful containers (`c`, and `d` on
    demand), vLLM in rootless containers (`e`, and `f` on demand). `engine` is the engines'
    version, `idle` the idle timeout of every model on demand, `port` the port of `b`."""
    on_demand = {"onDemand": {"enable": True, "idleTimeout": idle}}
    return llmhop(
        **{
            "llama-cpp": {
                "quadlet": {"user": None},
                "tag": f"server-b{engine}",
                "models": {
                    "a": {},
                    "b": {"port": port, **on_demand},
                    "c": {"runtime": "container"},
                    "d": {"runtime": "container", **on_demand},
                },
            },
            "vllm": {
                "tag": f"v0.{engine}.0",
                "models": {"e": {"model": "org/e"}, "f": {"model": "org/f", **on_demand}},
            },
        }
    )


# Generated units by their container files: quadlet-nix runs the generator in a derivation,
# built again only when a container file changed. (Podman's generator does not always order a
# unit's flags alike, so running it again on the same files may change a unit.)
GENERATED: dict[str, dict[str, Generated]] = {}


def units(config: dict[str, Any], engine: str, generator: Path, workdir: Path) -> dict[str, Any]:
    """Each manager's unit files: the rendered ones and the generated container units."""
    result = evaluate(config, pkgs={"llama-cpp": f"/nix/store/{engine * 32}-llama-cpp"})
    containers = json.dumps([result["quadlet"], sorted(result["userServices"])], sort_keys=True)
    if containers not in GENERATED:
        GENERATED[containers] = generate(generator, result, workdir)
    runs = GENERATED[containers]
    return {
        scope: result["units"][scope]["files"] | (runs[scope].texts if scope in runs else {})
        for scope in ("system", "user")
    }


def switch(old: dict[str, Any], new: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each manager's plan, every llmhop unit of the old configuration being active."""
    plans = {}
    for scope in ("system", "user"):
        active = {
            name
            for name in old[scope]
            if "/" not in name and name.startswith(("llmhop", "llama-cpp-", "vllm-"))
        }
        plans[scope] = plan(old[scope], new[scope], active)
    return plans


def documented() -> dict[str, str]:
    """docs/module.md's table: kind -> what a switch does to a changed unit of that kind."""
    section = MODULE_MD.read_text().split("### What `nixos-rebuild switch` does\n", 1)[1]
    lines = section.split("\n#", 1)[0].splitlines()
    table = [line for line in lines if line.startswith("| ")][2:]
    rows = [line.removeprefix("| ").split(" | ") for line in table]
    return {row[0]: row[2] for row in rows}


def expected_text(verbs: tuple[str, ...] | str, socket: tuple[str, ...] | None = None) -> str:
    """How the table writes a plan: `stop` `start`, left alone, and a socket's own verbs."""
    text = LEFT_ALONE if isinstance(verbs, str) else " ".join(f"`{v}`" for v in verbs)
    if socket:
        text += "; its socket " + " ".join(f"`{v}`" for v in socket)
    return text


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path


def test_what_a_switch_does_to_each_kind(generator: Path, workdir: Path) -> None:
    before = units(
        configuration(engine="1", idle="10min", port=18002), "1", generator, workdir / "0"
    )
    # An engine update and another idle timeout: every worker and every proxy changed.
    updated = units(
        configuration(engine="2", idle="20min", port=18002), "2", generator, workdir / "1"
    )
    # Another port for `b`: only its socket (and the router's config) changed.
    moved = units(
        configuration(engine="1", idle="10min", port=18012), "1", generator, workdir / "2"
    )
    assert updated["system"]["llama-cpp-a.service"] != before["system"]["llama-cpp-a.service"]
    assert updated["user"]["vllm-f.service"] != before["user"]["vllm-f.service"]
    assert (
        moved["system"]["llama-cpp-b-proxy.socket"] != before["system"]["llama-cpp-b-proxy.socket"]
    )

    update, move = switch(before, updated), switch(before, moved)
    found = {
        "native worker": expected_text(update["system"]["llama-cpp-a.service"]),
        "native worker on demand": expected_text(update["system"]["llama-cpp-b.service"]),
        "rootful container": expected_text(update["system"]["llama-cpp-c.service"]),
        "rootful container on demand": expected_text(update["system"]["llama-cpp-d.service"]),
        "rootless container": expected_text(update["user"]["vllm-e.service"]),
        "rootless container on demand": expected_text(update["user"]["vllm-f.service"]),
        "proxy": expected_text(
            update["system"]["llama-cpp-b-proxy.service"],
            update["system"]["llama-cpp-b-proxy.socket"],
        ),
        "rootless proxy": expected_text(
            update["user"]["vllm-f-proxy.service"], update["user"]["vllm-f-proxy.socket"]
        ),
        "socket": expected_text(move["system"]["llama-cpp-b-proxy.socket"]),
        "router": expected_text(move["system"]["llmhop.service"]),
    }
    assert found == {
        "native worker": "`stop` `start`",
        "native worker on demand": LEFT_ALONE,
        "rootful container": "`stop` `start`",
        "rootful container on demand": LEFT_ALONE,
        "rootless container": "`stop` `start`",
        "rootless container on demand": LEFT_ALONE,
        "proxy": "`stop`; its socket `stop` `start`",
        "rootless proxy": "`stop`; its socket `stop` `start`",
        "socket": LEFT_ALONE,
        "router": "`reload`",
    }
    # Nothing else moved in the second switch: the worker and proxy behind the socket stay.
    assert sorted(move["system"]) == ["llama-cpp-b-proxy.socket", "llmhop.service"]
    assert move["user"] == {}

    table = documented()
    assert set(table) == set(KINDS)
    for kind, text in found.items():
        assert table[kind].startswith(text), (kind, table[kind])


def test_on_demand_workers_are_marked_not_to_restart(generator: Path, workdir: Path) -> None:
    """The marks the plan rests on, where switch-to-configuration reads them: [Service]."""
    rendered = units(configuration(engine="1", idle="10min", port=18002), "1", generator, workdir)
    for scope, unit in (KINDS[k] for k in KINDS if k.endswith("on demand")):
        service = re.search(r"^\[Service\]\n(.*?)(?=^\[|\Z)", rendered[scope][unit], re.M | re.S)
        assert service is not None, unit
        assert "X-RestartIfChanged=false\n" in service[1], unit
    for scope, unit in (KINDS[k] for k in ("native worker", "rootful container")):
        assert "X-RestartIfChanged" not in rendered[scope][unit], unit
