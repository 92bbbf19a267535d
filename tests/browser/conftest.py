"""Browser fixtures: the real app in a subprocess, driven by Debian's Chromium via Playwright.

Never `playwright install` (it downloads a browser and fails offline): we launch
/usr/bin/chromium. Tests here are marked `browser`; they skip with a clear reason only when
Chromium is missing (the README's test command installs it).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
    "--no-first-run", "--disable-component-update", "--disable-sync",
]


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/browser" in str(item.fspath):
            item.add_marker(pytest.mark.browser)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def app_url():
    """Start `python app.py` on a free port; yield its URL; stop it afterwards."""
    port = _free_port()
    log = open(ROOT / "tests" / "browser" / f".app-{port}.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "app.py", "--port", str(port)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        # a live lab run of 20 steps (the grid's budget is 1000): a tiny point in seconds
        env={**os.environ, "PYTHONUNBUFFERED": "1", "VIT_EXPLORER_LAB_STEPS": "20"},
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"app.py exited with {proc.returncode}; see {log.name}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        raise RuntimeError("app.py did not serve within 120 s")
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()
    Path(log.name).unlink(missing_ok=True)


@pytest.fixture(scope="session")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"Chromium not found at {CHROMIUM} (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, app_url):
    """A fresh page with the app loaded (1400x1000 viewport)."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(120_000)
    page.goto(app_url)
    page.wait_for_selector(".gradio-container")
    yield page
    context.close()


@pytest.fixture
def fresh(browser, app_url):
    """A fresh browser context (no state carried over) at a projector's 1280x720, and the
    app's address (the page is not loaded yet: tests open their own links)."""
    context = browser.new_context(viewport={"width": 1280, "height": 720})
    page = context.new_page()
    page.set_default_timeout(120_000)
    yield page, app_url
    context.close()
