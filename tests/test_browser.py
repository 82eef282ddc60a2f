"""The UIs as a user meets them: headless Chromium, driven by Playwright, against `seal serve`.

Start a run of the tiny training deployment from the Prefect UI's custom-run form with one config
field changed, wait for it to complete, then find that run and its metrics in the MLflow UI.
Screenshots of each step go to the test's temporary folder (and $SEAL_SCREENSHOTS if set).

Needs Debian's Chromium (/usr/bin/chromium; `.ci/run` installs it) and the playwright package;
without either the test is skipped with the reason, never silently.
"""

import json
import os
import shutil
import time
from pathlib import Path

import pytest

CHROMIUM = Path(os.environ.get("SEAL_CHROMIUM", "/usr/bin/chromium"))
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        pytest.skip(f"playwright is not installed ({exc}); `make install` installs it")
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: `apt-get install chromium` (.ci/run does this as root)")
    with sync_playwright() as playwright:
        try:
            launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        except Exception as exc:  # a broken install: say so
            pytest.skip(f"Chromium at {CHROMIUM} did not start: {exc}")
        yield launched
        launched.close()


def test_a_run_started_in_the_prefect_ui_shows_up_in_mlflow(served, browser, tmp_path):
    from prefect.client.orchestration import SyncPrefectClient

    prefect_ui = f"http://127.0.0.1:{served['ports']['prefect']}"
    mlflow_ui = f"http://127.0.0.1:{served['ports']['mlflow']}"
    shots = tmp_path / "screenshots"
    shots.mkdir()
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(60_000)

    def shot(name: str) -> None:
        page.screenshot(path=shots / f"{name}.png", full_page=True)

    # The deployment, found in the Prefect UI's list.
    page.goto(f"{prefect_ui}/deployments")
    page.get_by_text("knowledge-tiny").first.wait_for()
    shot("1-deployments")
    page.get_by_text("knowledge-tiny").first.click()
    page.wait_for_url("**/deployments/deployment/**")
    shot("2-deployment")

    # Custom run: the parameters as JSON, with lora.rank changed and a one-iteration run.
    page.get_by_role("button", name="Run").first.click()
    page.get_by_text("Custom run").click()
    page.wait_for_url("**/run**")
    shot("3-custom-run-form")
    page.get_by_role("radio", name="JSON").or_(page.get_by_text("JSON", exact=True)).first.click()
    editor = page.locator(".cm-content").first
    editor.wait_for()
    config = json.loads(editor.inner_text())["config"]
    config["lora"]["rank"] = 2
    config["rl"]["iterations"] = 1
    config["tracking"]["experiment"] = "browser"
    editor.click()
    page.keyboard.press("Control+A")
    page.keyboard.press("Delete")
    page.keyboard.insert_text(json.dumps({"config": config}))
    shot("4-custom-run-json")
    page.get_by_role("button", name="Submit").click()
    page.wait_for_url("**/runs/flow-run/**")
    flow_run_id = page.url.rstrip("/").split("/")[-1]

    # Wait for the run to finish, as the page shows it.
    client = SyncPrefectClient(f"{prefect_ui}/api")
    deadline = time.monotonic() + 300
    while not (run := client.read_flow_run(flow_run_id)).state.is_final():
        assert time.monotonic() < deadline, f"flow run still {run.state.name} after 300 s"
        time.sleep(2)
    assert run.state.is_completed(), run.state.message
    assert run.parameters["config"]["lora"]["rank"] == 2
    page.reload()
    page.get_by_text("Completed").first.wait_for()
    shot("5-flow-run-completed")

    # The MLflow UI: the experiment, the run, its params and metrics.
    page.goto(f"{mlflow_ui}/#/experiments")
    page.get_by_text("browser").first.click()
    page.get_by_role("link", name=run.name).or_(page.get_by_text(run.name)).first.wait_for()
    shot("6-mlflow-experiment")
    page.get_by_role("link", name=run.name).or_(page.get_by_text(run.name)).first.click()
    page.get_by_text("reward_mean").first.wait_for()
    shot("7-mlflow-run")
    assert page.get_by_text("lora.rank").count() >= 1

    if target := os.environ.get("SEAL_SCREENSHOTS"):
        shutil.copytree(shots, target, dirs_exist_ok=True)
