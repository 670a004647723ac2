"""The status page in a real browser: Debian's Chromium, headless, driven by Selenium through
Debian's chromedriver. The page loads from the router alone, asks for a key, shows every model
with its state, and follows a model as its state changes."""

from __future__ import annotations

import json
import os
import shutil
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.support.processes import refused_url
from tests.support.router import RouterProcess

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
KEY = "browser-test-key-0123456789"
WAIT = 10.0

if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists() and shutil.which("chromium")):
    reason = "Debian's chromium and chromium-driver are not installed (tests/run installs them)"
    if os.environ.get("CI") or os.environ.get("LLMHOP_REQUIRE_E2E"):
        pytest.fail(f"{reason}: failing, not skipping", pytrace=False)
    pytest.skip(reason, allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


class Answering(BaseHTTPRequestHandler):
    """An upstream that answers every request with a small JSON body."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = b'{"choices": []}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def upstream() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Answering)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def router(upstream: str, tmp_path: Path) -> Iterator[RouterProcess]:
    config = {
        "authTokens": [KEY],
        "models": {"alpha": {"url": upstream}, "beta": {"url": refused_url()}},
    }
    process = RouterProcess(config, tmp_path)
    yield process
    process.stop()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=420,800",  # a phone's width
        f"--user-data-dir={tmp_path / 'chromium'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(WAIT)
    yield driver
    driver.quit()


def chat(router: RouterProcess, model: str) -> int:
    request = urllib.request.Request(
        router.base_url + "/v1/chat/completions",
        data=json.dumps({"model": model, "messages": []}).encode(),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=WAIT) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def state_shown(browser: webdriver.Chrome, model: str) -> str | None:
    rows = browser.find_elements(By.CSS_SELECTOR, f'tr[data-model="{model}"] td .state')
    return rows[0].text if rows else None


def test_the_page_shows_each_model_and_follows_its_state(
    router: RouterProcess, browser: webdriver.Chrome, tmp_path: Path
) -> None:
    wait = WebDriverWait(browser, WAIT)
    browser.get(router.base_url + "/ui")
    # Without a key /status says 401: the page asks for one.
    wait.until(lambda b: b.find_element(By.ID, "key").is_displayed())
    form = browser.find_element(By.ID, "key")
    form.find_element(By.ID, "token").send_keys(KEY)
    form.find_element(By.CSS_SELECTOR, "#key button").click()
    wait.until(lambda b: state_shown(b, "alpha") == "unknown" and state_shown(b, "beta"))
    assert state_shown(browser, "beta") == "unknown"
    assert not form.is_displayed()  # the key given, the form makes room for the models

    assert chat(router, "alpha") == 200
    assert chat(router, "beta") == 502
    wait.until(lambda b: state_shown(b, "alpha") == "ready")
    wait.until(lambda b: state_shown(b, "beta") == "unavailable")

    # Everything the page loaded came from the router.
    loaded = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name).concat([location.href])"
    )
    assert loaded and all(url.startswith(router.base_url) for url in loaded), loaded
    # The key stays in this tab's storage, never in the page's address.
    assert "key" not in browser.current_url and KEY not in browser.current_url
    assert browser.execute_script("return sessionStorage.getItem('llmhop-key')") == KEY
    assert browser.save_screenshot(str(tmp_path / "status-page.png"))
