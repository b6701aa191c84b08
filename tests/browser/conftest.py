"""Real-browser fixtures: Debian's Chromium driven by Playwright against the `comfy` test host.

Chromium comes from the system (`apt-get install chromium`); Playwright's own browser download is not
used. On a failing test the page is screenshotted to test-artifacts/browser/<test>.png.
"""
import os
import re
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts" / "browser"
CHROMIUM = os.environ.get("CVG_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--autoplay-policy=no-user-gesture-required"]


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    if not os.path.exists(CHROMIUM):
        pytest.fail(f"Chromium not found at {CHROMIUM}; install Debian's package: apt-get install -y chromium")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS, headless=True)
        yield b
        b.close()


class Console:
    def __init__(self):
        self.messages = []

    def errors(self):
        return [m for m in self.messages if m["type"] in ("error", "pageerror")]

    def pack_errors(self):
        """Errors raised by or mentioning this pack's extension."""
        pat = re.compile(r"comfyui-cvg|cvg\.js|\[comfyui-cvg", re.I)
        return [m for m in self.errors() if pat.search(m["text"]) or pat.search(m.get("url") or "")]


@pytest.fixture
def page(browser, comfy, request):
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    pg = context.new_page()
    console = Console()
    pg.on("console", lambda m: console.messages.append(
        {"type": m.type, "text": m.text, "url": (m.location or {}).get("url", "")}))
    pg.on("pageerror", lambda e: console.messages.append(
        {"type": "pageerror", "text": f"{e}\n{getattr(e, 'stack', '')}", "url": ""}))
    pg.console = console
    pg.goto(comfy.url + "/", wait_until="domcontentloaded")
    pg.wait_for_function("() => window.app && window.app.graph && window.LiteGraph", timeout=60000)
    pg.wait_for_function(
        "() => (window.app.extensions || []).some(e => e.name === 'comfyui-cvg.canvas')", timeout=60000)
    yield pg
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        name = re.sub(r"[^\w.-]+", "_", request.node.name)
        try:
            pg.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
            (ARTIFACTS / f"{name}.console.txt").write_text(
                "\n".join(f"[{m['type']}] {m['text']} {m['url']}" for m in console.messages))
        except Exception as e:  # the screenshot must never hide the real failure
            print(f"screenshot failed: {e}")
    context.close()
