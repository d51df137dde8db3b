"""The HTML report looked at in a real browser: Debian's chromium driven by Playwright, offline, from a file:// URL.

Needs ``apt-get install -y chromium`` and ``pip install playwright`` (Playwright cannot download its own browser
here); skipped with the reason when either is missing. The screenshot is kept in the test's tmp_path.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

CHROMIUM = Path(os.environ.get("CXR_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
HEADINGS = ("Summary", "Recipe", "Data", "Metrics", "Figures", "Environment")
LABELS = ["NORMAL", "BACTERIA", "VIRUS"]


def _browser_or_skip():
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install -y chromium)")
    return playwright


def _write_run(run: Path) -> None:
    """A small three-class run written by hand in the run directory's format (no training: that is tested
    elsewhere, and this machine is shared), with an evaluation whose metrics come from cxrkit itself."""
    from cxrkit.config import Recipe
    from cxrkit.eval.metrics import compute_metrics
    from cxrkit.runs import Run, atomic_write_text, csv_text

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 90)
    logits = rng.normal(size=(90, 3))
    logits[np.arange(90), y] += 2
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    files = Run(run)
    atomic_write_text(run / "recipe.yaml", yaml.safe_dump(Recipe().to_dict(), sort_keys=False))
    files.write_json("labels.json", {"name": "xray", "task": "multiclass", "labels": LABELS, "positive": None,
                                     "threshold": None})
    counts = {"images": 30, "patients": 20, "per_label": dict.fromkeys(LABELS, 10)}
    files.write_json("data.json", {"dataset": {"name": "xray", "task": "multiclass", "labels": LABELS},
                                   "splits": {s: counts for s in ("train", "val", "test")}, "skipped": [],
                                   "preprocessing": {"size": 224, "mean": [0.5], "std": [0.25]}})
    files.write_json("env.json", {"python": sys.version.split()[0], "argv": ["cxr", "train"]})
    files.write_metrics([{"epoch": e, "stage": 1 + (e > 2), "stage_name": "head" if e <= 2 else "finetune",
                          "train_loss": 1 / e, "val_loss": 1.1 / e, "train_accuracy": 0.5 + e / 20,
                          "val_accuracy": 0.5 + e / 25} for e in range(1, 5)])
    files.write_json("eval/test/metrics.json", {**compute_metrics("multiclass", LABELS, y, probs), "dataset": "xray",
                                                "split": "test", "patients": 60})
    rows = [{"source": f"{i}.png", "patient": str(i), "true": LABELS[t], "predicted": LABELS[int(p.argmax())],
             **{f"p_{n}": q for n, q in zip(LABELS, p)}} for i, (t, p) in enumerate(zip(y, probs))]
    atomic_write_text(run / "eval" / "test" / "predictions.csv", csv_text(rows))


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    """The report of a hand-written run, built by the ``report`` command."""
    _browser_or_skip()
    import typer

    from cxrkit.cli.report import report as report_command

    run = tmp_path_factory.mktemp("runs") / "xray-run"
    _write_run(run)
    app = typer.Typer()  # the command on its own, whether or not cxr's main module wires it yet
    app.command()(report_command)
    result = CliRunner().invoke(app, [str(run)])
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
