"""The page at / in a real browser: Debian's headless Chromium driven by Playwright.

The page is loaded through the fault proxy, so a test can break its connection mid-stream the
way a network drop would (RST), then watch it resume. Screenshots go to tests/artifacts/.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession
from fakes.proxy import FaultProxy
from playwright.async_api import Browser, Page, async_playwright

from conftest import Recorder, Running, eventually

pytestmark = pytest.mark.timeout(60)

CHROMIUM = "/usr/bin/chromium"
HAVE_CHROMIUM = Path(CHROMIUM).exists()
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
PACE = {"first_token_ms": 1, "tokens_per_second": 40}
ROUTES = {
    # Long enough to be stopped in the middle.
    "long": {"provider": "recording", "model": "tokenwire-sim-1", "options": PACE | {"answer_tokens": 500}},
    # Long enough to be broken in the middle, short enough to wait for its end.
    "short": {"provider": "recording", "model": "tokenwire-sim-1", "options": PACE | {"answer_tokens": 80}},
}
PROMPT = "Tell me about streaming."


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    assert HAVE_CHROMIUM, "the browser tests need Debian's chromium: apt-get install chromium"
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
async def served(start_server: Callable[..., Any]) -> AsyncIterator[tuple[Running, FaultProxy]]:
    running: Running = await start_server(ROUTES, http_listen="127.0.0.1:0")
    assert running.server.http is not None
    async with FaultProxy(running.server.http.port) as proxy:
        yield running, proxy


async def open_page(browser: Browser, proxy: FaultProxy, route: str) -> Page:
    # Playwright's waits evaluate strings, which the page's own policy (rightly) forbids.
    page = await browser.new_page(viewport={"width": 900, "height": 700}, bypass_csp=True)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    await page.goto(f"http://{proxy.address}/")
    await page.wait_for_function("document.querySelectorAll('#model option').length > 0")
    await page.select_option("#model", route)
    await page.fill("#prompt", PROMPT)
    assert errors == []
    return page


async def screenshot(page: Page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    await page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


async def test_the_page_streams_live_and_stop_cancels_the_provider(
    browser: Browser, served: tuple[Running, FaultProxy], recorder: Recorder
) -> None:
    running, proxy = served
    page = await open_page(browser, proxy, "long")
    await page.click("#send")
    # Live: the text grows while the stream runs, and time to first token is shown.
    await page.wait_for_function("document.querySelector('#answer').textContent.length > 40")
    early = len(await page.text_content("#answer") or "")
    await page.wait_for_function(f"document.querySelector('#answer').textContent.length > {early + 40}")
    assert (await page.text_content("#status")) == "streaming"
    assert "ms" in (await page.text_content("#ttft") or "")
    assert recorder.closed == []
    stopped_at = asyncio.get_running_loop().time()
    await page.click("#stop")
    await page.wait_for_function("document.querySelector('#status').textContent === 'stopped'")
    await eventually(lambda: len(recorder.closed) == 1, within=2.0)
    # The click goes through the browser and a Cancel call: the provider sees it at once.
    assert recorder.closed[0] - stopped_at < 0.5 and recorder.finished == [False]
    await eventually(lambda: running.server.gateway.active_streams == 0)
    await screenshot(page, "browser-stopped.png")


async def test_the_page_resumes_after_the_connection_drops_with_nothing_lost_or_doubled(
    browser: Browser, served: tuple[Running, FaultProxy], recorder: Recorder
) -> None:
    running, proxy = served
    assert running.server.http is not None
    # The same request unbroken (the simulated answer is deterministic), read past the proxy.
    body = {"model": "short", "messages": [{"role": "ROLE_USER", "text": PROMPT}]}
    async with (
        ClientSession() as session,
        session.post(f"http://127.0.0.1:{running.server.http.port}/v1/streams", json=body) as response,
    ):
        raw = (await response.read()).decode()
    whole = "".join(
        json.loads(line[6:])["textDelta"]["text"] for line in raw.splitlines() if line.startswith('data: {"sequence"')
        and '"textDelta"' in line
    )  # fmt: skip
    page = await open_page(browser, proxy, "short")
    await page.click("#send")
    await page.wait_for_function("document.querySelector('#answer').textContent.length > 30")
    # The network drops: every connection through the proxy is reset.
    proxy.reset_all()
    await page.wait_for_function("document.querySelector('#status').textContent.startsWith('finished')", timeout=20_000)
    assert int(await page.text_content("#reconnects") or "0") >= 1
    assert (await page.text_content("#answer")) == whole
    # One generation only: the resume read the journal, the provider was not asked again.
    assert len(recorder.requests) == 2
    path = await screenshot(page, "browser-resumed.png")
    assert path.stat().st_size > 0
