"""The service's web page in a real browser: Debian's chromium driven by Playwright, against ``cxr serve``'s app
under uvicorn on loopback, uploading a real X-ray from ``$CXR_SHARED/data``.

Skipped with the reason when chromium, Playwright or the shared data is missing. The screenshot is kept in the
test's tmp_path (its path is printed).
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("CXR_SHARED", REPO.parent / "shared"))
CHROMIUM = Path(os.environ.get("CXR_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def _real_xray() -> Path:
    folder = SHARED / "data" / "chest_xray" / "train" / "PNEUMONIA"
    found = sorted(folder.glob("*.jpeg"))[:1] if folder.is_dir() else []
    if not found:
        pytest.skip(f"no real X-ray in {folder} (set CXR_SHARED)")
    return found[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tiny_run, request):
    """The service on loopback; ``@pytest.mark.parametrize("server", [{...}], indirect=True)`` sets
    :class:`~cxrkit.serve.app.ServeSettings` fields."""
    import uvicorn

    from cxrkit.serve.app import ServeSettings, create_app

    port = _free_port()
    settings = ServeSettings(str(tiny_run), engine="torch", **getattr(request, "param", {}))
    config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not srv.started:
        assert thread.is_alive() and time.time() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=30)


@contextlib.contextmanager
def _uploaded(server: str, xray: Path):
    """The page in chromium after ``xray`` was dropped on it and its result shown: ``(page, requested URLs)``."""
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install -y chromium)")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            requests: list[str] = []
            page.on("request", lambda request: requests.append(request.url))
            page.goto(server + "/", wait_until="load")
            assert page.get_by_text("Research tool, not a diagnosis.").is_visible()
            page.wait_for_function("document.getElementById('model-line').textContent.includes('mobilenet_v3_small')")
            page.set_input_files("#file", str(xray))
            page.wait_for_selector("#result:not([hidden])", timeout=60_000)
            assert page.text_content("#label") in ("NORMAL", "PNEUMONIA") and xray.name in page.text_content("#status")
            yield page, requests
        finally:
            browser.close()


@pytest.mark.slow
def test_upload_a_real_xray_and_see_the_result(server, tmp_path):
    xray = _real_xray()
    shot = tmp_path / "page.png"
    with _uploaded(server, xray) as (page, requests):
        bars = page.eval_on_selector_all(".bar .fill", "els => els.map(e => parseFloat(e.style.width))")
        assert len(bars) == 2 and sum(bars) == pytest.approx(100, abs=0.1)
        size = page.eval_on_selector("#image", "e => [e.complete, e.naturalWidth, e.naturalHeight]")
        overlay = page.eval_on_selector("#map", "e => [e.complete, e.naturalWidth, e.naturalHeight]")
        assert size[0] and size[1] > 100 and overlay == size  # the heatmap covers the image exactly
        page.fill("#opacity", "80")
        page.dispatch_event("#opacity", "input")
        assert page.eval_on_selector("#map", "e => e.style.opacity") == "0.8"
        page.screenshot(path=str(shot), full_page=True)
    assert all(url.startswith((server, "data:")) for url in requests), requests  # no outside assets
    assert shot.stat().st_size > 30_000
    print(f"screenshot: {shot}", file=sys.stderr)


@pytest.mark.slow
@pytest.mark.parametrize("server", [{"heatmaps": False}], indirect=True)
def test_a_service_without_heatmaps_shows_the_result_without_a_picture(server):
    with _uploaded(server, _real_xray()) as (page, requests):
        assert page.is_hidden("#picture") and page.is_visible("#bars")
    assert any(url.endswith("/v1/predict") for url in requests) and not any("heatmap" in url for url in requests)
