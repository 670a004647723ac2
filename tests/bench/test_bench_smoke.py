"""The benchmark's building blocks at tiny sizes, so that `bench/run` cannot rot unnoticed.

Nothing here measures or asserts speed: benchmarks are never test assertions. The tests only
check that each block produces figures of the right shape. Those that need nginx, wrk or
taskset skip without them (`bench/run` installs them).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest

from bench import harness, report, sse_client, suite

pytestmark = pytest.mark.bench

needs_taskset = pytest.mark.skipif(shutil.which("taskset") is None, reason="no taskset")
needs_nginx_and_wrk = pytest.mark.skipif(
    shutil.which("wrk") is None
    or (shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists()),
    reason="nginx or wrk not installed (bench/run installs them)",
)


def tiny_options(work_dir: Path, *phases: str) -> suite.Options:
    return suite.Options(seconds=1, phases=frozenset(phases), write=False, work_dir=work_dir)


def test_wrk_summary_line_is_parsed() -> None:
    output = (
        "Running 1s test\n"
        'BENCH_RESULT {"requests":1200,"duration_us":500000,"socket_errors":1,'
        '"status_errors":2,"timeouts":0,"p50_us":80,"p90_us":120,"p99_us":300,'
        '"mean_us":95.5,"max_us":900}\n'
    )
    result = harness.parse_wrk_output(output)
    assert result.requests_per_second == 2400
    assert result.errors == 3
    assert result.p99_us == 300


def test_report_ratios_targets_and_document(tmp_path: Path) -> None:
    results = report.Results()
    figure = results.add("Section", "latency p50", "µs", {"direct": 10, "nginx": 20, "llmhop": 30})
    assert figure.ratio("llmhop", "nginx") == pytest.approx(1.5)
    assert figure.ratio("llmhop", "direct") == pytest.approx(3.0)
    results.add("Section", "added latency p50", "µs", {"nginx": 10.0, "llmhop": None})
    results.targets.append(report.Target("a goal", "1 µs", True))
    table = report.text_table(results)
    assert "1.50x" in table and "[met] a goal" in table

    document = tmp_path / "benchmarks.md"
    document.write_text("# Benchmarks\n\nhand-written intro\n")
    report.write_document(document, report.markdown(results, [("date", "today")], ["setup"]))
    report.write_document(document, "second run\n")
    text = document.read_text()
    assert "hand-written intro" in text and "second run" in text
    assert text.count(report.BEGIN_MARKER) == 1 and "latency p50" not in text


def test_the_plot_is_an_svg_naming_the_three_targets() -> None:
    results = report.Results()
    for concurrency in (1, 16):
        section = suite.small_section(concurrency)
        results.add(section, "latency p50", "µs", {"direct": 25, "nginx": 234, "llmhop": 437})
        results.add(section, "added latency p50", "µs", {"nginx": 209, "llmhop": 412})
        results.add(section, "proxy CPU per request", "µs", {"nginx": 24.1, "llmhop": 94.6})
    plot = report.svg_plot(results, [suite.small_section(c) for c in (1, 16, 64)])
    assert plot is not None
    root = ElementTree.fromstring(plot)
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    texts = " ".join(element.text or "" for element in root.iter())
    assert all(target in texts for target in ("direct", "nginx", "llmhop"))
    assert "concurrency 16" in texts and "concurrency 64" not in texts
    assert report.svg_plot(report.Results(), [suite.small_section(1)]) is None


def test_the_machine_is_described_in_users_words() -> None:
    assert suite._cpu_family("Intel(R) Xeon(R) CPU @ 2.20GHz") == "Intel Xeon"
    assert suite._cpu_family("AMD EPYC 7B13") == "AMD EPYC"
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", suite._llmhop_version())


def test_generation_timing_reads_openai_chunks() -> None:
    chunk = {"choices": [{"delta": {"content": "hi"}}]}
    record = sse_client.StreamRecord(sent_ns=1_000_000, complete=True)
    record.events = [
        (2_000_000, json.dumps({"choices": [{"delta": {"role": "assistant"}}]}).encode()),
        (3_000_000, json.dumps(chunk).encode()),
        (4_000_000, b"[DONE]"),
    ]
    timing = sse_client.generation_timing(record)
    assert timing is not None
    assert timing.tokens == 1
    assert timing.first_token_s == pytest.approx(0.002)
    assert timing.total_s == pytest.approx(0.003)


@needs_taskset
def test_sse_streams_direct_and_through_llmhop(tmp_path: Path) -> None:
    cores = harness.Pinning.for_this_machine()
    upstream = harness.start_sse_upstream(tmp_path, cores.load_cores)
    router = None
    try:
        config = harness.llmhop_config({"sse": upstream.url})
        router = harness.start_llmhop("llmhop", config, tmp_path, cores.proxy_cores)
        for service in (upstream, router):
            path = "/v1/chat/completions?chunks=5&interval_ms=2"
            request = sse_client.stream_request(service.host, service.port, path, {"model": "sse"})
            records = asyncio.run(
                sse_client.run_streams(service.host, service.port, request, 3, 0.001, 10)
            )
            assert all(r.complete and r.error is None for r in records), records
            transits = sse_client.transit_times_ns(records)
            assert len(transits) == 15 and min(transits) > 0
            assert len(sse_client.first_byte_times_ns(records)) == 3
            assert 0 <= sse_client.coalesced_fraction(records) <= 1
            assert not any(sse_client.stalled(r, 0.002, 5.0) for r in records)
        assert harness.llmhop_upstream_connections(router) >= 1
        assert harness.tree_cpu_seconds(router.pid) > 0
        assert harness.tree_rss_bytes(router.pid) > 1024 * 1024
    finally:
        if router is not None:
            router.stop()
        upstream.stop()


@needs_taskset
@needs_nginx_and_wrk
def test_small_post_phase_at_tiny_size(tmp_path: Path) -> None:
    bench = suite.Bench(tiny_options(tmp_path, "small"), harness.Pinning.for_this_machine())
    try:
        bench.start()
        runs = {name: bench.load(endpoint, 2) for name, endpoint in bench.endpoints.items()}
        sse_records = bench._streams(bench.endpoints["nginx"], "sse", 2, 0, 10, chunks=3)
    finally:
        bench.stop()
    for name, run in runs.items():
        assert run.wrk.requests > 0 and run.wrk.errors == 0, (name, run)
        assert (run.cpu_us_per_request() is None) == (name == "direct")
    assert all(r.complete for r in sse_records)
    bench._load_figures(suite.small_section(16), runs)
    bench.evaluate_targets()
    verdicts = {t.goal: t.met for t in bench.results.targets}
    assert verdicts["CPU per request at concurrency 16 <= 4x nginx's"] is not None
    assert verdicts["SSE: <= 1 % of chunks coalesced"] is None  # not measured here
    assert "llmhop ÷ nginx" in report.text_table(bench.results)


def test_python_path_comparison_runs_both_copies(tmp_path: Path) -> None:
    router = Path(harness.__file__).resolve().parents[1] / "pkgs" / "llmhop" / "llmhop.py"
    copy = tmp_path / "copy.py"
    copy.write_bytes(router.read_bytes())
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.python_path",
            str(router),
            str(copy),
            "--runs",
            "1",
            "--requests",
            "200",
        ],
        cwd=router.parents[2],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.splitlines()
    assert [line.split(" (")[0] for line in lines] == [str(router), str(copy)]
    assert all(re.search(r"fastest \d+\.\d+ µs, median \d+\.\d+ µs$", line) for line in lines)


@needs_taskset
@needs_nginx_and_wrk
def test_soak_phase_at_tiny_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(suite, "SOAK_RUN_SECONDS", 1)
    options = dataclasses.replace(tiny_options(tmp_path, "soak"), soak_requests=1)
    bench = suite.Bench(options, harness.Pinning.for_this_machine())
    try:
        bench.phase_soak()
    finally:
        bench.stop()
    figures = {f.name: f.value("llmhop") for f in bench.results.figures}
    assert figures["requests sent"] and figures["requests sent"] > 0
    assert figures["requests in flight after the soak"] == 0
    assert figures["unhandled errors in the log"] == 0
    assert figures["proxy RSS after the last run"] and figures["proxy RSS after the last run"] > 1


@needs_taskset
@needs_nginx_and_wrk
def test_baseline_phase_measures_both_revisions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(suite, "BASELINE_ROUNDS", 1)
    before = tmp_path / "before.py"
    before.write_bytes(harness.ROUTER_SCRIPT.read_bytes())
    options = dataclasses.replace(tiny_options(tmp_path, "baseline"), baseline=before)
    bench = suite.Bench(options, harness.Pinning.for_this_machine())
    try:
        bench.start()
        bench.phase_baseline()
    finally:
        bench.stop()
    names = {f.name for f in bench.results.figures if f.value("llmhop") is not None}
    for label in ("before", "now"):
        assert f"proxy CPU per request (c=16), {label}" in names
        assert f"latency p50 (c=1), {label}" in names
        # Without the small phase, the direct p50 that "added" counts from is measured too.
        assert f"added latency p50 (c=1), {label}" in names
