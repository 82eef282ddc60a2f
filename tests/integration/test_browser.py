"""The UIs as a user meets them: headless Chromium, driven by Playwright, against `seal serve`.

Start a run of the tiny training deployment from the Prefect UI's custom-run form with one config
field changed, wait for it to complete, then find that run and its metrics in the MLflow UI.
Screenshots of each step go to the test's temporary folder (and $SEAL_SCREENSHOTS if set).

Needs Debian's Chromium (/usr/bin/chromium; `.ci/run` installs it) and the playwright package;
without either the test is skipped with the reason, never silently.
"""

import os
import shutil
import time
from pathlib import Path

import pytest

CHROMIUM = Path(os.environ.get("SEAL_CHROMIUM", "/usr/bin/chromium"))
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


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
    link = page.get_by_role("link", name="knowledge-tiny").first
    deployment_url = prefect_ui + link.get_attribute("href")
    link.click()
    page.wait_for_url("**/deployments/deployment/**")
    page.get_by_text("seal-training").first.wait_for()
    shot("2-deployment")

    # Custom run (the deployment's "Run > Custom run" page): the typed config is a form; change
    # lora.rank, run one iteration, log to its own MLflow experiment.
    page.goto(f"{deployment_url}/run")
    page.get_by_text("Parameters").first.wait_for()
    shot("3-custom-run-form")

    def field(label: str, value: str) -> None:
        # The first field so labelled, in the config's order: lora.rank comes before policy_update.rank.
        box = page.locator(
            f"xpath=//*[normalize-space(text())='{label} (Optional)']/following::*[self::input or self::textarea][1]"
        ).first
        box.fill(value)

    field("Rank", "2")
    field("Iterations", "1")
    field("Experiment", "browser")
    shot("4-custom-run-changed")
    page.get_by_role("button", name="Submit").click()
    page.wait_for_url(deployment_url)  # back on the deployment, with the run scheduled

    # The run the form created; wait for it to finish, then look at it as the UI shows it.
    client = SyncPrefectClient(f"{prefect_ui}/api")
    deadline = time.monotonic() + 300
    while not (runs := client.read_flow_runs()):
        assert time.monotonic() < deadline, "the form created no flow run"
        time.sleep(1)
    (run,) = runs
    while not (run := client.read_flow_run(run.id)).state.is_final():
        assert time.monotonic() < deadline, f"flow run still {run.state.name} after 300 s"
        time.sleep(2)
    assert run.state.is_completed(), run.state.message
    assert run.parameters["config"]["lora"]["rank"] == 2
    page.goto(f"{prefect_ui}/runs/flow-run/{run.id}")
    page.get_by_text("Completed").first.wait_for()
    shot("5-flow-run-completed")

    # The MLflow UI: the experiment's runs table lists the run; its page shows params and metrics.
    from mlflow import MlflowClient

    tracking = MlflowClient(mlflow_ui)
    experiment = tracking.get_experiment_by_name("browser")
    (tracked,) = tracking.search_runs([experiment.experiment_id])
    assert tracked.data.tags["prefect.flow_run_id"] == str(run.id) and tracked.data.params["lora.rank"] == "2"
    page.goto(f"{mlflow_ui}/#/experiments/{experiment.experiment_id}/runs")
    page.wait_for_timeout(5000)
    shot("6-mlflow-experiment")
    page.get_by_text(tracked.info.run_name).first.wait_for()
    page.goto(f"{mlflow_ui}/#/experiments/{experiment.experiment_id}/runs/{tracked.info.run_id}")
    page.get_by_text("reward_mean").first.wait_for()
    shot("7-mlflow-run")

    if target := os.environ.get("SEAL_SCREENSHOTS"):
        shutil.copytree(shots, target, dirs_exist_ok=True)
