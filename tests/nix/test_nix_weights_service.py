"""Declared weights under a real systemd, against a stand-in of the Hugging Face hub
(fake_hub.py, in the namespace at HF_ENDPOINT) and the real huggingface_hub client: the fetch
units download the pinned files at boot and their llama.cpp workers (the fake engine) start
after them on the local file, offline; a second run fetches nothing; a download cut in the
middle resumes; a wrong revision and a gated repository without a token fail the fetch unit
with a clear message, and their workers never start; with `prune`, a switch to another
commit leaves only that commit's files in the cache."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from nix_harness import chat, llama_cpp_scenario, mk_force, python_with
from systemd_ns import SystemdNamespace

pytestmark = [pytest.mark.nix, pytest.mark.systemd, pytest.mark.usefixtures("real_systemd")]

# The fetch units run the real client (tests/requirements.txt pins it).
pytest.importorskip("huggingface_hub", reason="pip install -r tests/requirements.txt")

HERE = Path(__file__).resolve().parent
HUB_PORT = 8900
COMMIT = "c0ffee" * 6 + "c0ff"
OTHER_COMMIT = "d0d0" * 10
GGUF = "tiny-Q4_K_M.gguf"
# Above the hub client's 10 MiB read chunk, so that a cut after 11 MiB leaves a partial file.
BIG = b"GGUF" + hashlib.sha256(b"weights").digest() * (12 * 2**20 // 32)
CUT_AFTER = 11 * 2**20
SMALL = b"GGUF" + b"\0" * 4096
# The commit a pruned model is switched to, with other contents.
NEXT_COMMIT = "beef" * 10
NEXT = b"GGUF" + b"\1" * 4096

MODELS = {
    # model: (repository, revision)
    "tiny": ("llmhop-test/tiny-GGUF", COMMIT),
    "cut": ("llmhop-test/cut-GGUF", COMMIT),
    "wrong-revision": ("llmhop-test/tiny-GGUF", OTHER_COMMIT),
    "gated": ("llmhop-test/gated-GGUF", COMMIT),
    "pruned": ("llmhop-test/pruned-GGUF", COMMIT),
}
PRUNED = {"pruned"}


def hub_root(scratch: Path) -> Path:
    root = scratch / "hub"
    repos: dict[str, Any] = {}
    for repo, data in (
        ("llmhop-test/tiny-GGUF", SMALL),
        ("llmhop-test/cut-GGUF", BIG),
        ("llmhop-test/gated-GGUF", SMALL),
        ("llmhop-test/pruned-GGUF", SMALL),
    ):
        (root / repo).mkdir(parents=True)
        (root / repo / GGUF).write_bytes(data)
        # Not asked for: never fetched.
        (root / repo / "tiny-Q8_0.gguf").write_bytes(SMALL)
        repos[repo] = {"commit": COMMIT, "branches": {"main": COMMIT}}
    repos["llmhop-test/cut-GGUF"]["cut"] = {"file": GGUF, "after": CUT_AFTER}
    repos["llmhop-test/gated-GGUF"]["token"] = "accepted-token"
    (root / "next" / GGUF).parent.mkdir()
    (root / "next" / GGUF).write_bytes(NEXT)
    repos["llmhop-test/pruned-GGUF"]["revisions"] = {NEXT_COMMIT: "next"}
    (root / "repos.json").write_text(json.dumps(repos))
    (root / "requests.log").write_text("")
    root.chmod(0o777)
    (root / "requests.log").chmod(0o666)
    return root


def scenario(scratch: Path) -> dict[str, Any]:
    hub_root(scratch)
    shutil.copy(HERE / "fake_hub.py", scratch)
    return system(scratch)


def system(scratch: Path, revisions: dict[str, str] | None = None) -> dict[str, Any]:
    """The scenario's system, with `revisions` declared instead of MODELS' (a switch)."""
    models = {
        name: {
            "weights": {
                "huggingface": {
                    "repo": repo,
                    "revision": (revisions or {}).get(name, revision),
                    "files": [GGUF],
                },
                "prune": name in PRUNED,
            },
            "environment": {"HF_ENDPOINT": f"http://127.0.0.1:{HUB_PORT}"},
        }
        for name, (repo, revision) in MODELS.items()
    }
    failing = ("llama-cpp-wrong-revision.service", "llama-cpp-gated.service")
    hub = scratch / "fake_hub.py"
    root = scratch / "hub"
    config = llama_cpp_scenario(
        scratch,
        models,
        started_by_hand=failing,
        pkgs={"huggingface-hub-python": str(python_with(scratch / "pkgs", "huggingface-hub"))},
        services={
            "fake-hub": {
                "wantedBy": ["multi-user.target"],
                "before": ["network-online.target"],
                "serviceConfig": {
                    "Type": "notify",
                    "ExecStart": f"/usr/bin/python3 -I {hub} {HUB_PORT} {root}",
                },
            },
            # Retries come sooner than on a real box.
            **{
                f"llmhop-fetch-{name}": {"serviceConfig": {"RestartSec": mk_force(1)}}
                for name in MODELS
            },
        },
    )
    return config


def requests(scratch: Path) -> list[str]:
    return (scratch / "hub" / "requests.log").read_text().splitlines()


def info(ns: SystemdNamespace, model: str) -> dict[str, Any]:
    socket = f"/run/llmhop/llama-cpp-{model}/http.sock"
    status, body = ns.http("http://localhost/fake/info", unix_socket=socket)
    assert status == 200, body
    return json.loads(body)


def storage(model: str) -> str:
    """The hub cache's folder of the model's repository."""
    folder = "models--" + MODELS[model][0].replace("/", "--")
    return f"/var/cache/llama-cpp/{model}/hub/{folder}"


def snapshot(model: str) -> str:
    return f"{storage(model)}/snapshots/{MODELS[model][1]}"


def test_weights_are_fetched_before_the_worker_which_runs_offline(
    ns: SystemdNamespace, scratch: Path
) -> None:
    # The boot waited for both: the fetch, then the worker on the file it fetched.
    for model in ("tiny", "cut"):
        fetch, worker = f"llmhop-fetch-{model}.service", f"llama-cpp-{model}.service"
        assert ns.state(fetch) == "active", ns.journal(fetch)
        assert ns.state(worker) == "active", ns.journal(worker)
        done = int(
            ns.show(fetch, "ExecMainExitTimestampMonotonic")["ExecMainExitTimestampMonotonic"]
        )
        started = int(
            ns.show(worker, "ExecMainStartTimestampMonotonic")["ExecMainStartTimestampMonotonic"]
        )
        assert 0 < done < started
        engine = info(ns, model)
        argv = engine["argv"]
        assert argv[argv.index("--model") + 1] == f"{snapshot(model)}/{GGUF}"
        assert engine["environment"]["HF_HUB_OFFLINE"] == "1"
        assert f"{model}: already fetched" not in ns.journal(fetch)
        status, body = chat(ns, model)
        assert status == 200, body

    # The pinned file only, whole, as the worker's own user owns its cache.
    for model, data in (("tiny", SMALL), ("cut", BIG)):
        listing = ns.run("ls", snapshot(model)).stdout.split()
        assert listing == [GGUF]
        digest = ns.run("sha256sum", f"{snapshot(model)}/{GGUF}").stdout.split()[0]
        assert digest == hashlib.sha256(data).hexdigest()
    log = requests(scratch)
    assert not any("tiny-Q8_0" in line for line in log)

    cut = [line for line in log if line.startswith("GET /llmhop-test/cut-GGUF/resolve/")]
    # The cut download went on from what it had written (whole read chunks), not from 0.
    assert len(cut) == 2 and cut[0].endswith(" -"), cut
    resumed_at = int(cut[1].rpartition(" bytes=")[2].removesuffix("-"))
    assert 0 < resumed_at <= CUT_AFTER, cut

    # A second run (as at the next boot) and a worker restart ask the hub nothing.
    (scratch / "hub" / "requests.log").write_text("")
    assert ns.systemctl("restart", "llmhop-fetch-tiny.service", timeout=60).returncode == 0
    assert "already fetched, nothing to do" in ns.journal("llmhop-fetch-tiny.service")
    assert ns.systemctl("restart", "llama-cpp-tiny.service", timeout=60).returncode == 0
    assert requests(scratch) == []


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("wrong-revision", f"llmhop-test/tiny-GGUF has no revision {OTHER_COMMIT}"),
        (
            "gated",
            "llmhop-test/gated-GGUF is gated and needs an accepted licence and a token:"
            " set weights.tokenCredential",
        ),
    ],
)
def test_a_refused_fetch_fails_and_its_worker_never_starts(
    ns: SystemdNamespace, model: str, message: str
) -> None:
    fetch, worker = f"llmhop-fetch-{model}.service", f"llama-cpp-{model}.service"
    # Failed at boot, for good: the hub's refusal is not retried.
    assert ns.state(fetch) == "failed"
    result = ns.show(fetch, "Result", "ExecMainStatus", "NRestarts")
    assert result == {"Result": "exit-code", "ExecMainStatus": "2", "NRestarts": "0"}
    assert message in ns.journal(fetch)

    start = ns.systemctl("start", worker, timeout=60)
    assert start.returncode != 0
    assert "dependency" in start.stderr
    assert (
        ns.show(worker, "ExecMainStartTimestampMonotonic")["ExecMainStartTimestampMonotonic"] == "0"
    )


def test_prune_leaves_only_the_declared_commit(ns: SystemdNamespace, scratch: Path) -> None:
    fetch, worker = "llmhop-fetch-pruned.service", "llama-cpp-pruned.service"
    assert ns.state(worker) == "active", ns.journal(fetch) + ns.journal(worker)
    assert ns.run("ls", f"{storage('pruned')}/snapshots").stdout.split() == [COMMIT]
    # The declaration moves on to the next commit; switching restarts the fetch, then the
    # worker, under the new units.
    ns.install_units(system(scratch, {"pruned": NEXT_COMMIT})["units"]["system"])
    assert ns.systemctl("restart", fetch, timeout=60).returncode == 0, ns.journal(fetch)
    assert ns.systemctl("restart", worker, timeout=60).returncode == 0, ns.journal(worker)

    fetched = [line for line in requests(scratch) if "/pruned-GGUF/resolve/" in line]
    assert any(f"/resolve/{NEXT_COMMIT}/{GGUF}" in line for line in fetched), fetched
    # The commit no longer declared is gone with its file; the declared one stays.
    assert ns.run("ls", f"{storage('pruned')}/snapshots").stdout.split() == [NEXT_COMMIT]
    blobs = ns.run("ls", f"{storage('pruned')}/blobs").stdout.split()
    assert blobs == [hashlib.sha256(NEXT).hexdigest()]
    journal = ns.journal(fetch)
    assert f"pruning revision {COMMIT}" in journal
    assert f"pruning blob {hashlib.sha256(SMALL).hexdigest()}" in journal
    loaded = f"{storage('pruned')}/snapshots/{NEXT_COMMIT}/{GGUF}"
    argv = info(ns, "pruned")["argv"]
    assert argv[argv.index("--model") + 1] == loaded
    digest = ns.run("sha256sum", loaded).stdout.split()[0]
    assert digest == hashlib.sha256(NEXT).hexdigest()
    assert chat(ns, "pruned")[0] == 200
