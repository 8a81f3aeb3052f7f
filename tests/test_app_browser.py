"""The dashboard in headless Chromium (Playwright): launch a tiny run from the form, watch its
log lines and the VLM load badge appear, stop a second run; screenshots go to test-artifacts/.

Needs Debian's chromium at /usr/bin/chromium (`make test` installs it; Playwright's own browser
download is not reachable here)."""

import os
import re
import socket
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} missing: run `make test` (installs it)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    os.environ["NO_PROXY"] = "localhost,127.0.0.1"
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    from app.ui import build_demo, launch_kwargs

    runs_dir = tmp_path_factory.mktemp("dashboard-browser") / "runs"
    demo = build_demo(runs_dir)
    _, url, _ = demo.queue().launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(),
                                    quiet=True, **launch_kwargs(runs_dir))
    try:
        yield url
    finally:
        for name in demo.dashboard.runner.running():  # a failed test may leave a run behind
            try:
                demo.dashboard.runner.stop(name)
            except Exception:
                pass
        demo.dashboard.aim.stop()
        demo.close()


@pytest.fixture(scope="module")
def sandbox_root(tmp_path_factory):
    """Shared with tests/test_app.py: the tiny VLM and data are built once per session."""
    return tmp_path_factory.getbasetemp() / "dashboard-sandbox"


@pytest.fixture(scope="module")
def page(app_url):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        tab = browser.new_page(viewport={"width": 1500, "height": 1000})
        errors = []
        tab.on("pageerror", lambda e: errors.append(str(e)))
        tab.goto(app_url)
        tab.wait_for_selector("#launch", timeout=60_000)
        tab.errors = errors
        yield tab
        browser.close()


def launch(page, sandbox_root, name: str, extra: str = "") -> None:
    page.locator("#gin-file input").click()
    page.get_by_role("option", name="sandbox/tiny.gin", exact=True).click()
    page.locator("#overrides textarea").fill(f'sandbox_source.root = "{sandbox_root}"\n{extra}')
    page.locator("#run-name textarea").fill(name)
    page.locator("#launch").click()
    page.locator("#launch-msg").get_by_text(f"Started {name} on CPU").wait_for(timeout=180_000)


def log_text(page) -> str:
    return page.locator("#run-log textarea").input_value()


def wait_log(page, text: str, timeout_s: float) -> None:
    page.wait_for_function("t => (document.querySelector('#run-log textarea') || {}).value?.includes(t)",
                           arg=text, timeout=timeout_s * 1000)


def runs_row(page, name: str):
    return page.locator("#runs-table tr", has=page.get_by_text(name, exact=True))


def test_launch_watch_and_stop(page, sandbox_root):
    ARTIFACTS.mkdir(exist_ok=True)

    # A tiny run: the page switches to its log, which streams to the end; the badge turns green.
    launch(page, sandbox_root, "ui-tiny")
    assert page.get_by_role("tab", name="Log").get_attribute("aria-selected") == "true"
    wait_log(page, "Job train_teacher", 120)
    wait_log(page, "Saved checkpoint", 240)
    page.locator("#vlm-load", has_text="VLM loaded 1×").wait_for(timeout=60_000)
    assert "green" in page.locator("#vlm-load").get_attribute("class")
    runs_row(page, "ui-tiny").get_by_text("finished").wait_for(timeout=120_000)
    log = log_text(page)
    assert "weights ..." in log and re.search(r"step 6/6 \| loss", log)
    page.screenshot(path=str(ARTIFACTS / "dashboard-log.png"), full_page=True)

    # A long second run: stopped from its page once it trains.
    launch(page, sandbox_root, "ui-stop", "Trainer.steps = 100000")
    wait_log(page, "step 0/100000", 180)
    stop = page.locator("#stop")
    page.wait_for_function("() => !document.querySelector('#stop').disabled", timeout=30_000)
    stop.click()
    page.locator("#stop-msg").get_by_text("Stopping ui-stop").wait_for(timeout=30_000)
    runs_row(page, "ui-stop").get_by_text("stopped").wait_for(timeout=120_000)
    page.locator("#run-header .status-stopped").wait_for(timeout=30_000)
    wait_log(page, "Interrupted", 30)
    assert page.locator("#stop").is_disabled()

    # Back to the finished run (click its row): overview with the parameter table and loss curve.
    runs_row(page, "ui-tiny").locator("td").first.click()
    page.locator("#run-header", has_text="ui-tiny").wait_for(timeout=30_000)
    page.get_by_role("tab", name="Overview").click()
    page.locator("#params", has_text="Teacher head").wait_for(timeout=30_000)
    page.locator("#loss-plot canvas, #loss-plot svg").first.wait_for(timeout=30_000)
    page.wait_for_timeout(1500)  # let the plot draw
    page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
    assert "finished" in page.locator("#run-header").inner_text()
    assert not page.errors, page.errors
