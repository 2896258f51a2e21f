"""The dashboard's HTML pages (server-rendered, kept live by static/*.js) and its file routes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from difftrain_dist.ui.board import THUMBNAILS, board_of, dataset_info, inside, thumbnail
from difftrain_dist.ui.runs import read_recipe_yaml

router = APIRouter()
templates = Jinja2Templates(directory=Path(__file__).parent / "templates")


def page(request: Request, template: str, **context: Any) -> HTMLResponse:
    return templates.TemplateResponse(request, template, {"runs_dir": str(board_of(request).runs_dir), **context})


@router.get("/", response_class=HTMLResponse)
def runs_page(request: Request):
    return page(request, "runs.html", runs=board_of(request).summaries())


@router.get("/runs/{name}", response_class=HTMLResponse)
def run_page(request: Request, name: str):
    board = board_of(request)
    return page(request, "run.html", run=board.summary(board.run_dir(name)), name=name)


@router.get("/new", response_class=HTMLResponse)
def new_page(request: Request, source: str | None = None):
    """The new-run form; `?source=RUN` fills it with that run's recipe under the name RUN-2."""
    text = ""
    if source:
        recipe = read_recipe_yaml(board_of(request).run_dir(source))
        if isinstance(recipe.get("run"), dict):
            recipe["run"]["name"] = f"{source}-2"
        _unset_default_stage(recipe)
        text = yaml.safe_dump(recipe, sort_keys=False)
    return page(request, "new.html", text=text, source=source)


def _unset_default_stage(recipe: dict[str, Any]) -> None:
    """Drop `distributed.zero_stage` when it is the optimizer's default (the saved recipe spells
    every default out), so that changing the optimizer in the form picks that one's default."""
    from difftrain_dist.distrib.optimizers import stages_for

    distributed, train = recipe.get("distributed"), recipe.get("train")
    if not isinstance(distributed, dict) or not isinstance(train, dict):
        return
    try:
        default = 1 if 1 in stages_for(train.get("optimizer", "adamw")) else 0
    except (KeyError, ValueError, TypeError):
        return
    if distributed.get("zero_stage") == default:
        distributed.pop("zero_stage")


@router.get("/datasets", response_class=HTMLResponse)
def datasets_page(request: Request):
    folders = board_of(request).shard_folders()
    return page(request, "datasets.html", datasets=[dataset_info(f) for f in folders], thumbs=THUMBNAILS)


@router.get("/runs/{name}/files/{relative:path}")
def run_file(request: Request, name: str, relative: str):
    """A file inside the run folder (sample grids, loss.png, LoRA files as downloads)."""
    path = inside(board_of(request).run_dir(name), relative)
    return FileResponse(path, filename=path.name if path.suffix == ".safetensors" else None)


@router.get("/datasets/{number}/samples/{n}")
def dataset_sample(request: Request, number: int, n: int):
    """The `n`-th image (n < THUMBNAILS) of the `number`-th shard folder of the Datasets page."""
    folders = board_of(request).shard_folders()
    if not 0 <= number < len(folders) or not 0 <= n < THUMBNAILS:
        raise HTTPException(404, "no such dataset sample")
    data, media = thumbnail(folders[number], n)
    return Response(data, media_type=media)


@router.get("/favicon.ico")
def favicon():
    return RedirectResponse("/static/favicon.svg")
