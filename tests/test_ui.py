"""The dashboard's server on loopback without training: auth on every route, file routes that
serve nothing outside their folders, status from the driver lock and records, recipe errors at
their line, the loss plot."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
import yaml
from PIL import Image

from difftrain_dist.distrib.driver.record import RunBusyError, driving, lock_holder, read_driver_record
from difftrain_dist.distrib.lossplot import plot_loss, smooth
from difftrain_dist.ui.recipes import field_line
from difftrain_dist.ui.runs import run_status

from .procs import free_port
from .ui_server import raw_get, serve

SECRET = "top-secret-file-contents"


def _fake_run(runs: Path, name: str = "r1", steps: int = 5) -> Path:
    run = runs / name
    (run / "samples").mkdir(parents=True)
    (run / "recipe.yaml").write_text(yaml.safe_dump({"run": {"name": name}, "model": {"arch": "sd15"},
                                                     "train": {"max_steps": 10}}))
    with open(run / "metrics.jsonl", "w") as f:
        for step in range(1, steps + 1):
            f.write(json.dumps({"step": step, "loss": 1.0 / step, "lr": 1e-4 * step, "samples_per_s": 4.0,
                                "grad_norm": 0.5, "step_time_s": 0.5, "wall_time": time.time(),
                                "world_size": 2}) + "\n")
    Image.new("RGB", (8, 8), (200, 10, 10)).save(run / "samples" / "step_000000002.png")
    return run


@pytest.fixture
def runs(tmp_path) -> Path:
    runs = tmp_path / "runs"
    _fake_run(runs)
    (tmp_path / "secret.txt").write_text(SECRET)
    (runs / "r1" / "escape").symlink_to(tmp_path / "secret.txt")
    (runs / "r1" / "escape-dir").symlink_to(tmp_path)
    return runs


def test_file_routes_serve_nothing_outside_the_run_folder(runs):
    with serve(runs) as url:
        ok = httpx.get(f"{url}/runs/r1/files/samples/step_000000002.png")
        assert ok.status_code == 200 and ok.headers["content-type"] == "image/png"
        attempts = ["/runs/r1/files/../../secret.txt", "/runs/r1/files/%2e%2e/%2e%2e/secret.txt",
                    "/runs/r1/files/..%2f..%2fsecret.txt", "/runs/r1/files/%2fetc%2fpasswd",
                    "/runs/r1/files//etc/passwd", "/runs/r1/files/escape", "/runs/r1/files/escape-dir/secret.txt",
                    "/runs/..%2f/files/secret.txt", "/runs/%2e%2e/files/secret.txt", "/runs/r1/files/samples",
                    "/runs/.difftrain-ui/files/started.sqlite", "/datasets/0/samples/0", "/datasets/-1/samples/0",
                    "/static/../server.py", "/static/%2e%2e/server.py"]
        for path in attempts:
            status, body = raw_get(url, path)
            assert status in (400, 404), (path, status)
            assert SECRET.encode() not in body and b"root:" not in body and b"import" not in body


def test_loopback_dashboard_refuses_other_host_names_and_cross_origin_posts(runs):
    with serve(runs) as url:
        assert httpx.get(f"{url}/api/runs").status_code == 200
        # DNS rebinding: a page on evil.example resolving to 127.0.0.1 sends its own Host header
        assert httpx.get(f"{url}/api/runs", headers={"Host": "evil.example:8675"}).status_code == 403
        stop = f"{url}/api/runs/r1/stop"
        assert httpx.post(stop, json={}, headers={"Origin": "http://evil.example"}).status_code == 403
        assert httpx.post(stop, content="{}", headers={"Content-Type": "text/plain"}).status_code == 415
        assert httpx.post(stop, json={}).status_code == 409  # not running: nothing to stop


def test_token_is_checked_on_every_route(runs):
    token = "t0ken-abc"
    routes = ["/", "/runs/r1", "/new", "/datasets", "/api/runs", "/api/runs/r1", "/api/runs/r1/metrics",
              "/api/runs/r1/log", "/runs/r1/files/samples/step_000000002.png", "/static/app.js",
              "/static/vendor/uplot/uPlot.iife.min.js", "/datasets/0/samples/0"]
    with serve(runs, token=token) as url:
        for route in routes:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {token}"}):
                assert httpx.get(url + route, headers=headers).status_code == 401, (route, headers)
            assert httpx.get(url + route, params={"token": "x" + token}).status_code == 401
            good = httpx.get(url + route, headers={"Authorization": f"Bearer {token}"})
            assert good.status_code in (200, 404), (route, good.status_code)  # 404: no dataset here
        assert httpx.post(f"{url}/api/runs/r1/resume", json={}).status_code == 401
        # a browser: ?token= once sets a cookie, later requests carry only the cookie
        with httpx.Client(base_url=url) as browser:
            assert browser.get("/", params={"token": token}).status_code == 200
            assert browser.get("/api/runs").status_code == 200
            assert browser.get("/runs/r1/files/samples/step_000000002.png").status_code == 200


def test_a_token_dashboard_accepts_any_host_name(runs):
    with serve(runs, token="tok") as url:
        answer = httpx.get(f"{url}/api/runs", headers={"Host": "head-node:8675", "Authorization": "Bearer tok"})
        assert answer.status_code == 200 and answer.json()[0]["name"] == "r1"


def test_ui_beyond_loopback_makes_up_a_token_and_requires_it(tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "difftrain_dist", "ui", "--runs", str(tmp_path / "runs"),
                             "--host", "0.0.0.0", "--port", str(port)], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "DIFFTRAIN_UI_TOKEN": ""})
    try:
        first = proc.stderr.readline()
        assert "does not exist yet: made it" in first, first  # --runs did not exist
        line = proc.stderr.readline()
        assert "?token=" in line, line
        token = line.split("?token=")[1].split()[0]
        assert len(token) >= 24
        url = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                answer = httpx.get(f"{url}/api/runs")
                break
            except httpx.ConnectError:
                time.sleep(0.1)
        assert answer.status_code == 401
        assert httpx.get(f"{url}/api/runs", headers={"Authorization": f"Bearer {token}"}).json() == []
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)


def test_api_reads_metrics_incrementally_and_starts_over_for_a_new_session(runs):
    with serve(runs) as url:
        first = httpx.get(f"{url}/api/runs/r1/metrics").json()
        assert first["reset"] and [e["step"] for e in first["entries"]] == [1, 2, 3, 4, 5]
        with open(runs / "r1" / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": 6, "loss": 0.1}) + "\n" + '{"step": 7, "lo')  # a line being written
        more = httpx.get(f"{url}/api/runs/r1/metrics", params={"session": first["session"], "after": 5}).json()
        assert not more["reset"] and [e["step"] for e in more["entries"]] == [6]
        # a resumed session rewrites the file (a new inode): the client is told to start over
        tmp = runs / "r1" / "metrics.new"
        tmp.write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
        os.replace(tmp, runs / "r1" / "metrics.jsonl")
        again = httpx.get(f"{url}/api/runs/r1/metrics", params={"session": more["session"], "after": 6}).json()
        assert again["reset"] and again["entries"] == [{"step": 1, "loss": 2.0}]
        row = httpx.get(f"{url}/api/runs/r1").json()
        assert row["family"] == "sd15" and row["max_steps"] == 10 and row["samples"] == [
            {"step": 2, "file": "samples/step_000000002.png"}]
        log = httpx.get(f"{url}/api/runs/r1/log").json()
        assert log["text"] == "" and "not started from the dashboard" in log["note"]


HOLD = textwrap.dedent("""
    import sys, time
    from difftrain_dist.distrib.driver.record import driving
    with driving(sys.argv[1], None):
        print("holding", flush=True)
        time.sleep(600)
""")


def test_status_comes_from_the_driver_lock_and_record(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        assert lock_holder(run) == holder.pid
        assert run_status(run, 10, None, read_driver_record(run)).state == "running"
        with pytest.raises(RunBusyError, match=f"pid {holder.pid}"), driving(run, None):
            pass
        assert read_driver_record(run).pid == holder.pid  # the refused driver left the record alone
    finally:
        holder.kill()  # SIGKILL: no chance to write an outcome
        holder.wait()
    assert lock_holder(run) is None
    status = run_status(run, 10, None, read_driver_record(run))
    assert status.state == "failed" and "ended without recording how" in status.reason
    with driving(run, None) as record:
        record.outcome, record.reason = "stopped", "stopped by a signal at step 3"
    assert read_driver_record(run).outcome == "stopped" and lock_holder(run) is None
    with pytest.raises(ZeroDivisionError), driving(run, None):
        1 / 0  # noqa: B018
    record = read_driver_record(run)
    assert record.outcome == "failed" and record.reason == "division by zero" and record.ended >= record.started


def test_recipe_errors_name_their_line():
    text = "run:\n  name: x\ntrain:\n  max_steps: 0\n  lr: 1e-4\nconfig:\n  process:\n    - type: sd_trainer\n" \
           "      network:\n        linear_alpa: 4\n"
    assert field_line(text, "train.max_steps") == 4
    assert field_line(text, "train.missing") == 3  # the enclosing section
    assert field_line(text, "config.process[0].network.linear_alpa") == 10
    assert field_line(text, "nothing.here") is None


def test_validate_endpoint_places_errors(runs):
    recipe = "run:\n  name: fresh\n  bogus: 1\nmodel:\n  arch: sd15\n  path: /nowhere\ndata:\n  shards: /nowhere\n" \
             "train:\n  max_steps: 0\n"
    with serve(runs) as url:
        answer = httpx.post(f"{url}/api/recipes/validate", json={"recipe": recipe}).json()
        errors = {e["field"]: e for e in answer["errors"]}
        assert not answer["ok"]
        assert errors["run.bogus"]["line"] == 3 and errors["run.bogus"]["message"] == "unknown key"
        assert errors["train.max_steps"]["line"] == 10 and "greater than or equal to 1" in errors["train.max_steps"][
            "message"]
        assert errors["model.path"]["line"] == 6
        bad_yaml = httpx.post(f"{url}/api/recipes/validate", json={"recipe": "run: [\n"}).json()
        assert not bad_yaml["ok"] and "not valid YAML" in bad_yaml["errors"][0]["message"]
        started = httpx.post(f"{url}/api/runs", json={"recipe": recipe})
        assert started.status_code == 422 and not (runs / "fresh").exists()


def test_smoothing_is_tensorboards_debiased_ema():
    assert smooth([1.0, 1.0, 1.0], 0.9) == pytest.approx([1.0, 1.0, 1.0])  # debiased: no pull towards 0
    w = 0.5
    assert smooth([2.0, 0.0], w) == pytest.approx([2.0, (2.0 * w * (1 - w)) / (1 - w**2)])
    assert smooth([3.0, 4.0], 0.0) == [3.0, 4.0]
    with pytest.raises(ValueError, match="smoothing"):
        smooth([1.0], 1.0)


def test_plot_draws_loss_png_and_says_when_there_is_nothing(runs, tmp_path):
    out = plot_loss(runs / "r1")
    assert out == runs / "r1" / "loss.png"
    with Image.open(out) as image:
        assert image.size == (800, 450)
        assert len(set(image.convert("RGB").getdata())) > 10  # lines, text and axes were drawn
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run([sys.executable, "-m", "difftrain_dist", "plot", str(empty)], capture_output=True, text=True)
    assert proc.returncode == 2 and "no metrics.jsonl steps to plot yet" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "difftrain_dist", "plot", str(runs / "r1"), "--out",
                           str(tmp_path / "x.png"), "--smoothing", "0.5"], capture_output=True, text=True)
    assert proc.returncode == 0 and (tmp_path / "x.png").is_file(), proc.stderr


def test_only_loopback_names_count_as_loopback(runs):
    from difftrain_dist.ui.server import is_loopback

    assert all(is_loopback(h) for h in ("localhost", "127.0.0.1", "127.3.4.5", "::1", "[::1]"))
    assert not any(is_loopback(h) for h in ("127.0.0.1.evil.com", "127.evil.example", "localhost.evil.com", "0.0.0.0",
                                            "10.0.0.1", ""))
    with serve(runs) as url:
        for host in ("127.0.0.1.evil.com:8675", "127.evil.example", "127.0.0.1:8675:evil.com", "[::2]:8675"):
            assert httpx.get(f"{url}/api/runs", headers={"Host": host}).status_code == 403, host
        page = httpx.get(f"{url}/", headers={"Host": "[::1]:8675"})
        assert page.status_code == 200
        assert page.headers["x-frame-options"] == "DENY" and "frame-ancestors 'none'" in page.headers[
            "content-security-policy"]
        assert httpx.post(f"{url}/api/runs/r1/stop", content="{}",
                          headers={"Content-Type": "application/json-x"}).status_code == 415


def test_a_damaged_run_folder_never_hides_the_others(runs, tmp_path):
    damages = {
        "not-objects": ("metrics.jsonl", b'[1]\n5\n{"step": "x"}\n'),
        "strings": ("metrics.jsonl", b'{"step": 1, "loss": "x", "step_time_s": "x", "samples_per_s": "y"}\n'),
        "nan": ("metrics.jsonl", b'{"step": 1, "loss": NaN, "lr": Infinity}\n'),
        "bad-sections": ("recipe.yaml", b"train: [1]\nmodel: sd15\ndata: 5\n"),
        "not-utf8": ("recipe.yaml", b"run: {name: \xff\xfe}\n"),
    }
    for name, (file, data) in damages.items():
        (runs / name).mkdir()
        (runs / name / file).write_bytes(data)
        if file != "recipe.yaml":
            (runs / name / "recipe.yaml").write_text("train: {max_steps: abc}\n")
    (runs / "folder-metrics").mkdir()
    (runs / "folder-metrics" / "metrics.jsonl").mkdir()
    (runs / "folder-metrics" / "recipe.yaml").write_text("data: {shards: 5}\n")
    (tmp_path / "elsewhere").mkdir()
    _fake_run(tmp_path / "elsewhere", "linked")
    (runs / "linked").symlink_to(tmp_path / "elsewhere" / "linked")
    with serve(runs) as url:
        for route in ("/", "/api/runs", "/datasets", "/api/datasets", *(f"/runs/{n}" for n in damages),
                      *(f"/api/runs/{n}" for n in damages), *(f"/api/runs/{n}/metrics" for n in damages)):
            assert httpx.get(url + route).status_code == 200, route
        rows = {r["name"]: r for r in httpx.get(f"{url}/api/runs").json()}
        assert set(rows) == {"r1", "folder-metrics", *damages}  # a link to a run elsewhere is not followed
        assert rows["r1"]["last_loss"] == pytest.approx(0.2) and rows["nan"]["last_loss"] is None
        assert rows["strings"]["samples_per_s"] is None and rows["bad-sections"]["family"] is None
        long = "a" * 300
        for route in (f"/runs/{long}", f"/api/runs/{long}", f"/runs/r1/files/{long}", f"/new?source={long}",
                      "/runs/linked/files/recipe.yaml"):
            assert httpx.get(url + route).status_code == 404, route


def test_a_failure_after_the_last_checkpoint_is_not_shown_as_finished(tmp_path):
    from difftrain_dist.distrib.checkpoint import CheckpointInfo
    from difftrain_dist.distrib.driver.record import DriverRecord

    final = CheckpointInfo(path=tmp_path / "checkpoint_000000010", step=10, valid=True)
    record = DriverRecord(pid=1, host="h", started=1.0, command=[], outcome="failed", reason="No space left on device")
    status = run_status(tmp_path, 10, final, record)
    assert (status.state, status.reason) == ("failed", "No space left on device; resumable from step 10")
    killed = run_status(tmp_path, 10, final, record.model_copy(update={"outcome": None, "reason": None}))
    assert killed.state == "failed" and "ended without recording how" in killed.reason
    assert run_status(tmp_path, 10, final, None).state == "finished"  # no record: the checkpoints decide


def test_recipes_of_odd_shapes_are_refused_with_a_reason(runs):
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(7))
    with serve(runs) as url:
        started = time.monotonic()
        answer = httpx.post(f"{url}/api/recipes/validate", json={"recipe": bomb}).json()
        assert "aliases" in answer["errors"][0]["message"] and time.monotonic() - started < 5
        for recipe in ("run: 5\nmodel: 5\n", "job: extension\nconfig: {name: x, process: [{network: 5}]}\n",
                       "job: extension\nconfig: 5\n"):
            answer = httpx.post(f"{url}/api/recipes/validate", json={"recipe": recipe})
            assert answer.status_code == 200 and not answer.json()["ok"], (recipe, answer.text)
        assert httpx.post(f"{url}/api/recipes/validate", json={"recipe": {"run": {}}}).status_code == 400
        (runs / "r1" / "checkpoint_000000001").mkdir()
        odd = httpx.post(f"{url}/api/runs/r1/checkpoints/checkpoint_000000001/export", json={"dtype": {"a": 1}})
        assert odd.status_code == 400
    assert list((runs / ".difftrain-ui" / "recipes").glob("*")) == []  # nothing kept of invalid recipes


def test_new_run_form_checks_wandb_here_and_leaves_the_stage_to_the_optimizer(runs, tiny_sd15_model, photo_shards,
                                                                             monkeypatch):
    for name in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    recipe = {"run": {"name": "wb"}, "model": {"arch": "sd15", "path": str(tiny_sd15_model)},
              "data": {"shards": str(photo_shards)}, "train": {"max_steps": 2}, "logging": {"wandb": True}}
    with serve(runs) as url:
        answer = httpx.post(f"{url}/api/recipes/validate", json={"recipe": yaml.safe_dump(recipe)}).json()
        assert not answer["ok"] and answer["errors"][0]["field"] == "logging.wandb"
        assert "WANDB_API_KEY" in answer["errors"][0]["message"] and answer["errors"][0]["line"]
        monkeypatch.setenv("WANDB_MODE", "offline")
        assert httpx.post(f"{url}/api/recipes/validate", json={"recipe": yaml.safe_dump(recipe)}).json()["ok"]
        saved = yaml.safe_load((runs / "r1" / "recipe.yaml").read_text())
        saved.update(train={"max_steps": 10, "optimizer": "adamw"}, distributed={"zero_stage": 1, "num_workers": 2})
        (runs / "r1" / "recipe.yaml").write_text(yaml.safe_dump(saved))
        page = httpx.get(f"{url}/new", params={"source": "r1"}).text
        assert "name: r1-2" in page and "zero_stage" not in page and "num_workers: 2" in page
