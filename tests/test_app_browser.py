"""The dashboard in headless Chromium (Playwright): launch a tiny run from the form, watch its
log lines and the VLM load badge appear, stop a second run; screenshots go to test-artifacts/.

Needs Debian's chromium at /usr/bin/chromium (`make test` installs it; Playwright's own browser
download is not reachable here)."""

import os
import re
from pathlib import Path

import pytest

from reflow_exp.files import free_port

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"

pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} missing: run `make test` (installs it)"
)


@pytest.fixture(scope="module")
def app(tmp_path_factory, dashboard_server):
    """The dashboard on a free port: (url, its Dashboard)."""
    os.environ["NO_PROXY"] = "localhost,127.0.0.1"
    with dashboard_server(tmp_path_factory.mktemp("dashboard-browser") / "runs", free_port()) as served:
        yield served


@pytest.fixture(scope="module")
def page(app):
    from playwright.sync_api import sync_playwright

    app_url, _ = app
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
    page.locator("#allow-outside input").check()  # the sandbox cache is shared, outside the runs folder
    page.locator("#run-name textarea").fill(name)
    page.locator("#launch").click()
    page.locator("#launch-msg").get_by_text(f"Started {name} on CPU").wait_for(timeout=180_000)


def log_text(page) -> str:
    return page.locator("#run-log textarea").input_value()


def wait_log(page, text: str, timeout_s: float) -> None:
    page.wait_for_function(
        "t => (document.querySelector('#run-log textarea') || {}).value?.includes(t)",
        arg=text,
        timeout=timeout_s * 1000,
    )


def runs_row(page, name: str, status: str = ""):
    """The runs table's row of ``name`` (with ``status``, if given)."""
    row = page.locator("#runs-table [role=row]").filter(has_text=re.compile(rf"(^|\s){re.escape(name)}\s"))
    return row.filter(has_text=status) if status else row


def test_launch_watch_and_stop(app, page, sandbox_root):
    ARTIFACTS.mkdir(exist_ok=True)

    # A long run, then a tiny one while the long one still trains: the page follows each run as it
    # is launched (the log switches at once, it does not wait for the first run to end).
    launch(page, sandbox_root, "ui-stop", "Trainer.steps = 100000")
    assert page.get_by_role("tab", name="Log").get_attribute("aria-selected") == "true"
    wait_log(page, "Job train_teacher", 180)
    wait_log(page, "step 0/100000", 180)
    launch(page, sandbox_root, "ui-tiny")
    wait_log(page, "ui-tiny", 30)
    assert runs_row(page, "ui-stop", "running").count() == 1

    # Back to the long run (click its row) and stop it.
    runs_row(page, "ui-stop").locator("[role=gridcell]").first.click()
    wait_log(page, "ui-stop", 30)
    page.wait_for_function("() => !document.querySelector('#stop').disabled", timeout=30_000)
    page.locator("#stop").click()
    page.locator("#stop-msg").get_by_text("Stopping ui-stop").wait_for(timeout=30_000)
    runs_row(page, "ui-stop", "stopped").wait_for(timeout=120_000)
    page.locator("#run-header .status-stopped").wait_for(timeout=30_000)
    wait_log(page, "Interrupted", 30)
    assert page.locator("#stop").is_disabled()
    assert page.locator("#stop-msg").get_by_text("Stopping ui-stop").is_visible()  # not wiped by the page's refresh

    # The tiny run (click its row): its log to the end, the VLM load badge turns green.
    runs_row(page, "ui-tiny").locator("[role=gridcell]").first.click()
    page.locator("#run-header", has_text="ui-tiny").wait_for(timeout=30_000)
    wait_log(page, "ui-tiny", 30)
    wait_log(page, "Saved checkpoint", 240)
    runs_row(page, "ui-tiny", "finished").wait_for(timeout=240_000)
    page.locator("#vlm-load", has_text="VLM loaded 1×").wait_for(timeout=60_000)
    assert "green" in page.locator("#vlm-load").get_attribute("class")
    wait_log(page, "step 6/6 | loss", 30)
    assert "weights ..." in log_text(page)
    page.screenshot(path=str(ARTIFACTS / "dashboard-log.png"), full_page=True)

    # Its overview: the parameter table and the loss curve.
    page.get_by_role("tab", name="Overview").click()
    page.locator("#params", has_text="Teacher head").wait_for(timeout=30_000)
    page.locator("#loss-plot canvas, #loss-plot svg").first.wait_for(timeout=30_000)
    page.wait_for_timeout(1500)  # let the plot draw
    page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
    assert "finished" in page.locator("#run-header").inner_text()
    assert not page.errors, page.errors
