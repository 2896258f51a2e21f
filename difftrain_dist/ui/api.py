"""The dashboard's JSON API: runs, metrics, logs, checkpoints and exports, recipes, actions."""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from difftrain_dist.distrib.checkpoint import CHECKPOINT_DIR
from difftrain_dist.distrib.driver.record import lock_holder
from difftrain_dist.ui import control
from difftrain_dist.ui.board import Dashboard, board_of, dataset_info
from difftrain_dist.ui.recipes import Checked, check_recipe
from difftrain_dist.ui.runs import CONSOLE_LOG, is_run_folder, sample_grids

router = APIRouter(prefix="/api")
LOG_CHUNK = 64 * 1024
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
"""Terminal colour and cursor codes (Ray prefixes worker lines with them), dropped from log text."""
NOT_FROM_HERE = "this run was not started from the dashboard: its output went to the terminal that started it"


@router.get("/runs")
def runs(request: Request):
    return board_of(request).summaries()


@router.get("/runs/{name}")
def run(request: Request, name: str):
    """The run's row plus its checkpoints (newest first), sample grids and exported files."""
    board = board_of(request)
    path = board.run_dir(name)
    return {
        **board.summary(path),
        "checkpoints": [{"name": i.path.name, "step": i.step, "valid": i.valid, "reason": i.reason,
                         "size_bytes": i.size_bytes, "loss": i.loss, "world_size": i.world_size}
                        for i in reversed(board.checkpoints.all(path))],
        "samples": sample_grids(path),
        "exports": sorted(f"exports/{p.name}" for p in (path / "exports").glob("*.safetensors")),
        "has_loss_plot": (path / "loss.png").is_file(),
    }


@router.get("/runs/{name}/recipe")
def recipe(request: Request, name: str):
    path = board_of(request).run_dir(name) / "recipe.yaml"
    return {"text": path.read_text(encoding="utf-8") if path.is_file() else ""}


@router.get("/runs/{name}/metrics")
def metrics(request: Request, name: str, session: str = "", after: int = 0):
    """The entries after the first `after` of `session`; all of them, with `reset`, when the file
    is another session's (a resume rewrote it) and the client must start over."""
    board = board_of(request)
    current, entries = board.metrics.read(board.run_dir(name))
    start = after if session == current else 0
    return {"session": current, "reset": start == 0, "entries": entries[start:]}


@router.get("/runs/{name}/log")
def log(request: Request, name: str, offset: int = -1):
    """The console log from byte `offset` (-1: its last 64 KiB), at most 64 KiB at once; a Ray
    job's log from the cluster."""
    board = board_of(request)
    path = board.run_dir(name) / CONSOLE_LOG
    if not path.is_file():
        started = board.registry.get(name)
        if started and started["kind"] == "ray":
            from difftrain_dist.cluster import jobs

            try:
                text = jobs.logs(started["job_id"], started["address"])
            except ValueError as err:
                text = str(err)
            return {"offset": len(text), "text": ANSI_ESCAPE.sub("", text[-LOG_CHUNK:]), "reset": True}
        return {"offset": 0, "text": "", "reset": True, "note": NOT_FROM_HERE}
    size = path.stat().st_size
    reset = offset < 0 or offset > size
    start = max(0, size - LOG_CHUNK) if reset else offset
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(LOG_CHUNK)
    text = ANSI_ESCAPE.sub("", data.decode("utf-8", errors="replace"))
    return {"offset": start + len(data), "text": text, "reset": reset}


@router.post("/runs/{name}/stop")
def stop(request: Request, name: str):
    """The preemption path: SIGTERM to the driver (Ray's stop_job for a submitted run)."""
    board = board_of(request)
    path = board.run_dir(name)
    started = board.registry.get(name)
    try:
        if started and started["kind"] == "ray" and lock_holder(path) is None:  # its driver is on the cluster
            from difftrain_dist.cluster import jobs

            jobs.stop(started["job_id"], started["address"])
            return {"stopping": name}
        return {"stopping": name, "pid": control.stop_local(path)}
    except ValueError as err:
        raise HTTPException(409, str(err)) from None


@router.post("/runs/{name}/resume")
def resume(request: Request, name: str):
    board = board_of(request)
    path = board.run_dir(name)
    status = board.summary(path)["status"]
    if status in ("running", "starting", "finished"):
        raise HTTPException(409, f"run {name} is {status}")
    if not (path / "recipe.yaml").is_file():
        raise HTTPException(409, f"run {name} has no recipe.yaml to resume with")
    pid = control.spawn_driver(path, ["resume", str(path)], cwd=board.cwd)
    board.registry.record(name, "local", pid=pid, command=f"resume {path}")
    return {"name": name, "pid": pid}


@router.post("/runs/{name}/checkpoints/{checkpoint}/export")
async def export(request: Request, name: str, checkpoint: str):
    """Write the checkpoint's LoRA file in {"format", "dtype"} (empty: the run's own) under
    RUN/exports/; answers its download URL."""
    path = board_of(request).run_dir(name)
    if not CHECKPOINT_DIR.match(checkpoint) or not (path / checkpoint).is_dir():
        raise HTTPException(404, f"no checkpoint {checkpoint!r} in run {name}")
    body = await json_body(request)
    fmt, dtype = body.get("format") or None, body.get("dtype") or None
    if not all(value is None or isinstance(value, str) for value in (fmt, dtype)):
        raise HTTPException(400, "format and dtype are names (strings), e.g. \"kohya\", \"float16\"")
    out = path / "exports" / f"{checkpoint}-{fmt or 'default'}-{dtype or 'saved'}.safetensors"
    try:
        await run_in_threadpool(_export, path / checkpoint, out, fmt, dtype)
    except ValueError as err:
        raise HTTPException(400, str(err)) from None
    return {"file": f"exports/{out.name}", "url": f"/runs/{name}/files/exports/{out.name}"}


def _export(checkpoint: Path, out: Path, fmt: str | None, dtype: str | None) -> Path:
    from difftrain_dist.distrib.export import export_checkpoint  # torch and DeepSpeed: off the event loop

    return export_checkpoint(checkpoint, out, fmt, dtype)


@router.post("/recipes/validate")
async def validate(request: Request):
    """{"recipe": YAML text, "address": Ray Jobs URL or null} → {"ok", "errors": [{field, message, line}]}."""
    board = board_of(request)
    body = await json_body(request)
    checked = await run_in_threadpool(check_recipe, recipe_text(body), board.registry.folder / "recipes",
                                      board.runs_dir, check_paths=not body.get("address"))
    if checked.file is not None:
        checked.file.unlink(missing_ok=True)
    return checked_answer(checked, board)


@router.post("/runs")
async def start(request: Request):
    """Start a recipe: {"recipe": YAML text, "address": Ray Jobs URL, or null for this machine,
    "python": the interpreter on the cluster's head node (default "python")}.
    422 with the errors when it is not valid; 409 when that run is running already."""
    board = board_of(request)
    body = await json_body(request)
    address = body.get("address") or None
    if address is not None and not isinstance(address, str):
        raise HTTPException(400, "address is a Ray Jobs URL (a string)")
    checked = await run_in_threadpool(check_recipe, recipe_text(body), board.registry.folder / "recipes",
                                      board.runs_dir, check_paths=address is None)
    if checked.recipe is None:
        return JSONResponse(checked_answer(checked, board), 422)
    name = checked.recipe.run.name
    run_dir = board.runs_dir / name
    if is_run_folder(run_dir) and board.summary(run_dir)["status"] in ("running", "starting"):
        checked.file.unlink(missing_ok=True)
        raise HTTPException(409, f"run {name} is already running")
    if address:
        try:
            return submit(board, checked, address, str(body.get("python") or "python"))
        finally:
            checked.file.unlink(missing_ok=True)  # the job took its own copy
    args = ["train", str(checked.file), "--set", f"run.storage_path={board.runs_dir}"]
    pid = control.spawn_driver(run_dir, args, cwd=board.cwd)
    board.registry.record(name, "local", pid=pid, command=" ".join(args))
    return {"name": name, "pid": pid, "url": f"/runs/{name}"}


def submit(board: Dashboard, checked: Checked, address: str, python: str) -> dict[str, Any]:
    """Submit a validated recipe as a Ray job running `python -m difftrain_dist train` on the
    cluster (secrets from ./.env, as `difftrain-dist submit` does)."""
    from difftrain_dist.cluster import jobs
    from difftrain_dist.cluster.secrets import DEFAULT_ENV_FILE, read_env_file

    recipe = checked.recipe
    secrets = read_env_file(DEFAULT_ENV_FILE) if DEFAULT_ENV_FILE.is_file() else {}
    try:
        submission = jobs.submit(recipe, address=address, secrets=secrets, python=python)
    except ValueError as err:
        raise HTTPException(400, str(err)) from None
    (board.runs_dir / recipe.run.name).mkdir(parents=True, exist_ok=True)
    board.registry.record(recipe.run.name, "ray", job_id=submission.job_id, address=submission.address)
    return {"name": recipe.run.name, "job_id": submission.job_id, "url": f"/runs/{recipe.run.name}"}


@router.get("/datasets")
def datasets(request: Request):
    return [dataset_info(f) for f in board_of(request).shard_folders()]


def checked_answer(checked: Checked, board: Dashboard) -> dict[str, Any]:
    answer: dict[str, Any] = {"ok": checked.recipe is not None, "errors": [asdict(e) for e in checked.errors]}
    if checked.recipe is not None:
        recipe = checked.recipe
        answer["name"] = recipe.run.name
        answer["summary"] = (f"{recipe.model.arch}, {recipe.train.max_steps} steps, "
                             f"{recipe.distributed.num_workers} worker(s), ZeRO-{recipe.distributed.zero_stage}")
        if is_run_folder(board.runs_dir / recipe.run.name):
            answer["note"] = f"run {recipe.run.name} exists: starting it continues from its newest valid checkpoint"
    return answer


def recipe_text(body: dict[str, Any]) -> str:
    """The body's "recipe": YAML text. HTTPException 400 for anything else."""
    text = body.get("recipe")
    if not isinstance(text, str):
        raise HTTPException(400, "recipe: the YAML text of a recipe (a string)")
    return text


async def json_body(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError:
        raise HTTPException(400, "the body is not JSON") from None
    if not isinstance(body, dict):
        raise HTTPException(400, "the body must be a JSON object")
    return body
