"""Browser fixtures: the real app in a subprocess, driven by Debian's Chromium via Playwright.

Never `playwright install` (it downloads a browser and fails offline): we launch
/usr/bin/chromium. Tests here are marked `browser`; they skip with a clear reason only when
Chromium is missing (the README's test command installs it).
"""

from __future__ import annotations

import os
import subprocess
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


@pytest.fixture(scope="session")
def app_url():
    """Start `python app.py` on a free port; yield its URL; stop it afterwards."""
    from explorer.bench.serve_session import start_app

    log_path = ROOT / "tests" / "browser" / f".app-{os.getpid()}.log"
    log = open(log_path, "w")  # noqa: SIM115
    # a live lab run of 20 steps (the grid's are 3,000 or more): a tiny point in seconds
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "VIT_EXPLORER_LAB_STEPS": "20"}
    try:
        proc, url, _ = start_app(env, output=log, timeout=120)
    except RuntimeError as e:
        raise RuntimeError(f"{e}; see {log_path}") from None
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()
    log_path.unlink(missing_ok=True)


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
