"""The HTML report looked at in a real browser: Debian's chromium driven by Playwright, offline, from a file:// URL.

Needs ``apt-get install -y chromium`` and ``pip install playwright`` (Playwright cannot download its own browser
here); skipped with the reason when either is missing. The screenshot is kept in the test's tmp_path.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from synth import kermany_folder
from typer.testing import CliRunner

CHROMIUM = Path(os.environ.get("CXR_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
HEADINGS = ("Summary", "Recipe", "Data", "Metrics", "Figures", "Environment")
TINY = ["--backbone", "mobilenet_v3_small", "--weights", "none", "--set", "model.image_size=32",
        "--set", "runtime.workers=0", "--set", "runtime.batch_size=8", "--epochs", "1",
        "--set", "stages.1.trainable=all", "--set", "stages.1.epochs=1", "--set", "data.split.ratios=[0.5,0.25,0.25]"]


def _browser_or_skip():
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install -y chromium)")
    return playwright


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    """A report of a tiny trained and evaluated run, built by the ``report`` command."""
    _browser_or_skip()
    import typer

    from cxrkit.cli.main import app
    from cxrkit.cli.report import report as report_command

    data = kermany_folder(tmp_path_factory.mktemp("xray"), per_class=12, size=32)
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--data", str(data), "--out", str(tmp_path_factory.mktemp("runs")), *TINY])
    assert result.exit_code == 0, result.output
    run = Path(result.stdout.strip().splitlines()[-1])
    result = runner.invoke(app, ["evaluate", str(run), "--split", "test"])
    assert result.exit_code == 0, result.output
    report_app = typer.Typer()  # the command on its own, whether or not cxr's main module wires it yet
    report_app.command()(report_command)
    result = runner.invoke(report_app, [str(run)])
    assert result.exit_code == 0, result.output
    return Path(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_report_renders_in_chromium(report, tmp_path):
    playwright = _browser_or_skip()
    shot = tmp_path / "report.png"
    with playwright.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=str(CHROMIUM), args=CHROMIUM_ARGS,
            headless=True, viewport={"width": 1280, "height": 900}, offline=True)
        try:
            page = context.new_page()
            requests: list[str] = []
            page.on("request", lambda request: requests.append(request.url))
            page.goto(report.resolve().as_uri(), wait_until="load")
            for heading in HEADINGS:
                assert page.get_by_role("heading", name=heading, exact=True).is_visible(), heading
            images = page.eval_on_selector_all("img", "els => els.map(e => [e.complete, e.naturalWidth])")
            assert len(images) >= 5 and all(done and width > 0 for done, width in images), images
            page.screenshot(path=str(shot), full_page=True)
        finally:
            context.close()
    assert all(url.startswith(("file:", "data:")) for url in requests), requests  # nothing fetched from a network
    _assert_non_trivial(shot)
    print(f"screenshot: {shot}", file=sys.stderr)


def _assert_non_trivial(shot: Path) -> None:
    from PIL import Image

    assert shot.stat().st_size > 50_000
    with Image.open(shot) as image:
        width, height = image.size
        colours = image.convert("RGB").resize((width // 8, height // 8)).getcolors(maxcolors=1 << 16)
    assert width >= 1000 and height > 2000, image.size  # the whole page, not only the first screen
    assert colours is None or len(colours) > 50  # None: more than 65,536 colours
