"""The dashboard's API on real runs of the tiny SD1.5 (embedded Ray, DeepSpeed): a finished run's
checkpoints, samples and exports; a run started from the dashboard followed while it trains,
through a restart of the dashboard, stopped (checkpoint, exit 75), resumed and finished."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
import yaml
from safetensors import safe_open

from difftrain_dist.distrib.driver.record import read_driver_record
from difftrain_dist.distrib.metrics import read_metrics

from .test_train_run import run_cli
from .ui_server import serve

pytestmark = pytest.mark.slow


def tiny_recipe(model: Path, shards: Path, name: str, max_steps: int, *, sample_every: int | None = 2) -> dict:
    """One worker, a rank-4 LoRA; a one-prompt sample grid every `sample_every` steps."""
    sample = {"every_n_steps": sample_every, "prompts": ["a photo"], "num_inference_steps": 2, "resolution": 64}
    return {
        "run": {"name": name, "seed": 3, "output_dir": "out", "storage_path": "runs"},
        "model": {"arch": "sd15", "path": str(model)},
        "lora": {"rank": 4, "alpha": 4},
        "data": {"shards": str(shards), "resolution": 64, "micro_batch_size": 1},
        "train": {"max_steps": max_steps, "lr": 1e-3},
        "checkpoint": {"every_n_steps": 1000, "keep_last": 2},
        "sample": sample if sample_every else {},
    }


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_sd15_model, photo_shards) -> Path:
    """A working folder with `runs/done`: 4 steps trained by the CLI, samples at steps 2 and 4."""
    home = tmp_path_factory.mktemp("dashboard")
    (home / "done.yaml").write_text(yaml.safe_dump(tiny_recipe(tiny_sd15_model, photo_shards, "done", 4)))
    proc = run_cli("train", "done.yaml", "--no-progress", cwd=home)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return home


def wait_for(url: str, name: str, check, timeout: float = 300) -> dict:
    """Poll /api/runs/NAME until `check(row)`; returns the row."""
    deadline = time.monotonic() + timeout
    row: dict = {}
    while time.monotonic() < deadline:
        answer = httpx.get(f"{url}/api/runs/{name}", timeout=30)
        if answer.status_code == 200:
            row = answer.json()
            if check(row):
                return row
            assert row["status"] not in ("failed", "aborted", "unknown"), row
        time.sleep(0.3)
    raise TimeoutError(f"run {name}: last seen {row}")


def test_a_finished_run_through_the_api(finished):
    with serve(finished / "runs", cwd=finished) as url:
        [row] = httpx.get(f"{url}/api/runs").json()
        assert (row["name"], row["family"], row["status"], row["step"], row["max_steps"]) == ("done", "sd15",
                                                                                          "finished", 4, 4)
        assert row["workers"] == 1 and row["where"] == "this machine, embedded Ray" and row["eta_s"] is None
        assert row["last_loss"] == read_metrics(finished / "runs" / "done")[-1]["loss"]
        run = httpx.get(f"{url}/api/runs/done").json()
        assert [(c["name"], c["valid"]) for c in run["checkpoints"]] == [("checkpoint_000000004", True)]
        assert run["checkpoints"][0]["size_bytes"] > 0 and run["has_loss_plot"]
        assert [s["step"] for s in run["samples"]] == [2, 4]
        image = httpx.get(f"{url}/runs/done/files/{run['samples'][-1]['file']}")
        assert image.status_code == 200 and image.content[:8] == b"\x89PNG\r\n\x1a\n"
        assert httpx.get(f"{url}/runs/done/files/loss.png").content[:4] == b"\x89PNG"
        metrics = httpx.get(f"{url}/api/runs/done/metrics").json()
        assert [e["step"] for e in metrics["entries"]] == [1, 2, 3, 4]
        assert "max_steps: 4" in httpx.get(f"{url}/api/runs/done/recipe").json()["text"]
        # export in the other format and dtype, then download it
        done = httpx.post(f"{url}/api/runs/done/checkpoints/checkpoint_000000004/export",
                          json={"format": "kohya", "dtype": "float16"}, timeout=120)
        assert done.status_code == 200, done.text
        download = httpx.get(url + done.json()["url"])
        assert download.status_code == 200 and "attachment" in download.headers["content-disposition"]
        (finished / "got.safetensors").write_bytes(download.content)
        with safe_open(finished / "got.safetensors", "pt") as f:
            keys = list(f.keys())
            assert keys and all(k.startswith("lora_unet_") for k in keys)
            assert str(f.get_tensor(next(k for k in keys if k.endswith("lora_down.weight"))).dtype) == "torch.float16"
        bad = httpx.post(f"{url}/api/runs/done/checkpoints/checkpoint_000000004/export", json={"format": "ckpt"})
        assert bad.status_code == 400 and "--format" in bad.json()["detail"]
        assert httpx.get(f"{url}/api/datasets").json()[0]["num_samples"] > 0


def test_a_run_started_from_the_dashboard_is_followed_stopped_resumed_and_finished(
        tmp_path, tiny_sd15_model, photo_shards):
    runs, max_steps = tmp_path / "runs", 60  # the stop comes long before the last step
    recipe = yaml.safe_dump(tiny_recipe(tiny_sd15_model, photo_shards, "live", max_steps, sample_every=10))
    with serve(runs, cwd=tmp_path) as url:
        started = httpx.post(f"{url}/api/runs", json={"recipe": recipe})
        assert started.status_code == 200, started.text
        assert httpx.get(f"{url}/api/runs/live").json()["status"] in ("starting", "running")
        row = wait_for(url, "live", lambda r: r["status"] == "running" and r["step"] >= 3)
        assert row["eta_s"] > 0 and row["samples_per_s"] > 0 and row["workers"] == 1
        assert f"pid {read_driver_record(runs / 'live').pid}" in row["reason"]
        again = httpx.post(f"{url}/api/runs", json={"recipe": recipe})
        assert again.status_code == 409 and "already running" in again.json()["detail"]
        log = httpx.get(f"{url}/api/runs/live/log").json()
        assert "started by the dashboard" in log["text"] and "run live: 1 worker(s)" in log["text"]
    # the dashboard restarts; the run went on and is found running again
    with serve(runs, cwd=tmp_path) as url:
        assert httpx.get(f"{url}/api/runs/live").json()["status"] == "running"
        assert httpx.post(f"{url}/api/runs/live/resume", json={}).status_code == 409
        stop = httpx.post(f"{url}/api/runs/live/stop", json={})
        assert stop.status_code == 200, stop.text
        row = wait_for(url, "live", lambda r: r["status"] == "stopped")
        stopped_at = row["newest_checkpoint"]
        assert row["reason"] == f"checkpoint at step {stopped_at}" and 3 <= stopped_at < max_steps
        assert read_driver_record(runs / "live").outcome == "stopped"
        assert "exit" not in row["reason"] and "stopped at step" in httpx.get(f"{url}/api/runs/live/log").json()["text"]
        resumed = httpx.post(f"{url}/api/runs/live/resume", json={})
        assert resumed.status_code == 200, resumed.text
        row = wait_for(url, "live", lambda r: r["status"] == "finished", timeout=400)
        assert row["step"] == max_steps and (tmp_path / "out" / "live.safetensors").is_file()
    # metrics.jsonl went on across the stop: every step once
    assert [m["step"] for m in read_metrics(runs / "live")] == list(range(1, max_steps + 1))


ARTIFACTS = Path(__file__).resolve().parents[1] / "build" / "test-artifacts" / "ui"
CHART_PIXELS = """
const canvas = document.querySelector(arguments[0] + " canvas");
if (!canvas) return 0;
const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
let drawn = 0;
for (let i = 3; i < data.length; i += 4) if (data[i] > 0) drawn++;
return drawn;
"""


@pytest.fixture
def browser():
    """Headless Chromium (Debian's chromium + chromium-driver) driven by Selenium."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for binary in ("/usr/bin/chromium", "/usr/bin/chromedriver"):
        assert Path(binary).exists(), f"{binary} is missing: apt-get install chromium chromium-driver"
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1400,1500"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        yield driver
    finally:
        driver.quit()


def _start_from_the_form(driver, url: str, recipe: dict):
    from selenium.webdriver.common.by import By

    driver.get(f"{url}/new")
    driver.execute_script("const t = document.getElementById('recipe-text'); t.value = arguments[0];"
                          "t.dispatchEvent(new Event('input'));", yaml.safe_dump(recipe))
    driver.find_element(By.ID, "start").click()


def test_the_dashboard_in_a_real_browser(finished, browser, tiny_sd15_model, photo_shards):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as seen
    from selenium.webdriver.support.ui import WebDriverWait

    def wait(condition, timeout=60):
        """Until `condition(driver)` is truthy; elements the page re-renders meanwhile are looked up again."""
        return WebDriverWait(browser, timeout, poll_frequency=0.25,
                             ignored_exceptions=[StaleElementReferenceException]).until(condition)

    def text_of(selector):
        return lambda d: d.find_element(By.CSS_SELECTOR, selector).text

    def shows(selector, *parts):
        return lambda d: all(part in text_of(selector)(d) for part in parts)

    def status_is(state):
        return lambda d: d.find_element(By.ID, "status").text == state

    with serve(finished / "runs", cwd=finished) as url:
        browser.get(url)
        wait(shows('tr[data-run="done"]', "finished", "4 / 4", "sd15", "this machine"))
        browser.save_screenshot(str(ARTIFACTS / "runs.png"))

        browser.get(f"{url}/runs/done")
        wait(lambda d: d.find_element(By.ID, "points").get_attribute("data-points") == "4")
        assert browser.execute_script(CHART_PIXELS, "#chart-loss") > 200, "the loss chart drew nothing"
        image = wait(seen.visibility_of_element_located((By.ID, "sample-image")))
        wait(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image) > 0)
        assert browser.find_element(By.ID, "sample-step").text.startswith("4 ")
        wait(shows('tr[data-checkpoint="checkpoint_000000004"]', "valid", "lora.safetensors"))
        browser.save_screenshot(str(ARTIFACTS / "run.png"))

        # a typo is shown at its line
        bad = tiny_recipe(tiny_sd15_model, photo_shards, "typo", 3)
        bad["train"]["max_stepz"] = 3
        browser.get(f"{url}/new")
        browser.execute_script("document.getElementById('recipe-text').value = arguments[0];", yaml.safe_dump(bad))
        browser.find_element(By.ID, "validate").click()
        wait(shows('li[data-field="train.max_stepz"]', "line ", "unknown key"))

        _start_from_the_form(browser, url, tiny_recipe(tiny_sd15_model, photo_shards, "quick", 3))
        wait(seen.url_to_be(f"{url}/runs/quick"))
        wait(status_is("finished"), timeout=300)
        wait(shows('tr[data-checkpoint="checkpoint_000000003"]', "valid"))
        browser.save_screenshot(str(ARTIFACTS / "started-and-finished.png"))

        _start_from_the_form(browser, url, tiny_recipe(tiny_sd15_model, photo_shards, "long", 400, sample_every=None))
        wait(seen.url_to_be(f"{url}/runs/long"))
        wait(status_is("running"), timeout=300)
        wait(lambda d: int(d.find_element(By.ID, "points").get_attribute("data-points") or 0) >= 2, timeout=120)
        wait(seen.element_to_be_clickable((By.ID, "stop"))).click()
        wait(status_is("stopped"), timeout=300)
        wait(shows("#checkpoints tbody tr", "valid"))
        assert wait(text_of("#reason")).startswith("checkpoint at step ")
        browser.save_screenshot(str(ARTIFACTS / "stopped.png"))
