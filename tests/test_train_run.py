"""Whole runs: `difftrain-dist train` on an embedded Ray cluster, 2 workers, DeepSpeed ZeRO-2 on
gloo, on the tiny model and real photographs; then the files a user gets are checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from difftrain_dist.distrib.checkpoint import inspect_checkpoint, list_checkpoints
from difftrain_dist.distrib.export import export_valid_checkpoint
from difftrain_dist.models import read_lora_file

from .lora_checks import hand_merged_unet, outputs_without_and_with_lora, unet_output
from .procs import cli_here, torchrun

pytestmark = pytest.mark.slow
# fp32 on CPU: LoRA applied by diffusers vs merged into the weights differ by summation order only.
MERGE_ATOL = 1e-5


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "difftrain_dist", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_sd15_model, photo_shards):
    work = tmp_path_factory.mktemp("run")
    recipe = {
        "run": {"name": "tiny", "seed": 7, "output_dir": "out", "storage_path": "runs"},
        "model": {"arch": "sd15", "path": str(tiny_sd15_model)},
        "lora": {"rank": 4, "alpha": 8},
        "data": {"shards": str(photo_shards), "resolution": 64, "micro_batch_size": 2},
        "train": {"max_steps": 4, "lr": 1e-2},
        "distributed": {"num_workers": 2, "zero_stage": 2},
        "checkpoint": {"every_n_steps": 2, "keep_last": 1},
    }
    (work / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    proc = run_cli("train", "recipe.yaml", cwd=work)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return work, proc


def test_run_writes_lora_and_reports_progress(trained_run):
    work, proc = trained_run
    assert (work / "out" / "tiny.safetensors").is_file()
    assert "step 4/4  loss" in proc.stderr
    assert "samples/s" in proc.stderr and "eta" in proc.stderr
    assert "LoRA written" in proc.stderr


def test_checkpoints_follow_the_contract(trained_run):
    work, _ = trained_run
    infos = list_checkpoints(work / "runs" / "tiny")
    assert [(c.step, c.valid) for c in infos] == [(4, True)]  # keep_last=1 removed step 2
    ckpt = infos[0].path
    for rank in (0, 1):
        manifest = json.loads((ckpt / f"rank_{rank}.json").read_text())
        assert manifest["world_size"] == 2 and manifest["zero_stage"] == 2 and manifest["step"] == 4
        assert manifest["state"]["samples_seen"] == 4 * 2
        assert set(manifest["rng"]) >= {"python", "numpy", "torch", "noise_generator"}
        assert any(f"zero_pp_rank_{rank}_" in name for name in manifest["files"])
    frozen = [p.name for p in ckpt.rglob("*model_states.pt")]
    assert frozen and all(p.stat().st_size < 2_000_000 for p in ckpt.rglob("*.pt"))  # no base weights


def test_exported_lora_equals_in_memory_lora_of_last_checkpoint(trained_run):
    """The final file is the last checkpoint's lora.safetensors (written from the in-memory
    weights); consolidating the DeepSpeed shards instead (the fallback) gives the same weights."""
    work, _ = trained_run
    ckpt = work / "runs" / "tiny" / "checkpoint_000000004"
    assert (work / "out" / "tiny.safetensors").read_bytes() == (ckpt / "lora.safetensors").read_bytes()
    from_shards = export_valid_checkpoint(inspect_checkpoint(ckpt), work / "from_shards.safetensors",
                                          from_shards=True)
    exported, header = read_lora_file(from_shards)
    in_memory, _ = read_lora_file(ckpt / "lora.safetensors")
    assert exported.keys() == in_memory.keys() and len(exported) > 0
    for key, value in exported.items():
        torch.testing.assert_close(value, in_memory[key], atol=0, rtol=0)
    assert header["ss_steps"] == "4" and header["ss_network_dim"] == "4"
    lora_b = [v for k, v in exported.items() if k.endswith((".lora_B.weight", ".lora_up.weight"))]
    assert max(float(v.abs().max()) for v in lora_b) > 0, "training never moved lora_B off zero"


def test_trained_lora_loads_in_diffusers_and_equals_hand_merge(trained_run, tiny_sd15_model):
    work, _ = trained_run
    lora_file = work / "out" / "tiny.safetensors"
    base, with_lora = outputs_without_and_with_lora(tiny_sd15_model, lora_file)
    assert (with_lora - base).abs().max() > 1e-4
    merged, count = hand_merged_unet(tiny_sd15_model, lora_file)
    assert count > 0
    torch.testing.assert_close(with_lora, unet_output(merged), atol=MERGE_ATOL, rtol=0)


def test_export_diffusers_layout_and_sample_cli(trained_run, tiny_sd15_model):
    """The default SD1.5 file is kohya-layout (ComfyUI and A1111 map only that); `export --format
    diffusers` writes the peft layout, and `sample` renders the same image with either."""
    work, _ = trained_run
    default, _ = read_lora_file(work / "out" / "tiny.safetensors")
    assert default and all(k.startswith("lora_unet_") for k in default)
    assert any(k.endswith(".alpha") for k in default)
    ckpt = work / "runs" / "tiny" / "checkpoint_000000004"
    proc = cli_here("export", str(ckpt), "-o", "tiny_peft.safetensors", "--format", "diffusers", cwd=work)
    assert proc.exit_code == 0, proc.stderr[-3000:]
    tensors, _ = read_lora_file(work / "tiny_peft.safetensors")
    assert tensors and all(k.startswith("unet.") and ".lora_" in k for k in tensors)
    for lora in ("out/tiny.safetensors", "tiny_peft.safetensors"):
        proc = cli_here("sample", str(tiny_sd15_model), "a photo of a cat", "--lora", lora,
                        "--steps", "2", "--resolution", "64", "--out", f"{lora}.png", cwd=work)
        assert proc.exit_code == 0, proc.stderr[-3000:]
    from PIL import Image

    a = Image.open(work / "out/tiny.safetensors.png")
    b = Image.open(work / "tiny_peft.safetensors.png")
    assert a.size == (64, 64) and list(a.getdata()) == list(b.getdata())


def test_torchrun_worker_zero3_without_ray(tmp_path, tiny_sd15_model, photo_shards):
    """The worker loop under torchrun env vars (how GPU machines without Ray run it), ZeRO-3 with
    a DataLoader worker: the LoRA gathered in memory equals the one consolidated from the shards."""
    recipe = {
        "run": {"name": "tr", "seed": 3, "output_dir": "out", "storage_path": "runs"},
        "model": {"arch": "sd15", "path": str(tiny_sd15_model)},
        "lora": {"rank": 4, "alpha": 4},
        "data": {"shards": str(photo_shards), "resolution": 64, "micro_batch_size": 2, "loader_workers": 1},
        "train": {"max_steps": 3, "lr": 1e-2},
        "distributed": {"num_workers": 2, "zero_stage": 3},
        "checkpoint": {"every_n_steps": 3},
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    proc = subprocess.run(torchrun(2, "worker", "r.yaml"), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "step 3/3  loss" in proc.stderr
    ckpt = tmp_path / "runs" / "tr" / "checkpoint_000000003"
    assert (tmp_path / "out" / "tr.safetensors").read_bytes() == (ckpt / "lora.safetensors").read_bytes()
    exported, _ = read_lora_file(export_valid_checkpoint(inspect_checkpoint(ckpt), tmp_path / "shards.safetensors",
                                                         from_shards=True))
    in_memory, _ = read_lora_file(ckpt / "lora.safetensors")
    assert exported.keys() == in_memory.keys() and len(exported) > 0
    for key, value in exported.items():
        torch.testing.assert_close(value, in_memory[key], atol=0, rtol=0)


def test_rerunning_the_recipe_resumes_after_pruned_checkpoints(trained_run):
    """keep_last pruned checkpoint 2; running the same recipe with more steps continues from 4."""
    work, _ = trained_run
    proc = run_cli("train", "recipe.yaml", "--set", "train.max_steps=6", "--no-progress", cwd=work)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "resumed from checkpoint_000000004 (step 4)" in proc.stderr
    assert [(c.step, c.valid) for c in list_checkpoints(work / "runs" / "tiny")] == [(6, True)]
    _, header = read_lora_file(work / "out" / "tiny.safetensors")
    assert header["ss_steps"] == "6"


def test_changed_recipe_is_refused_before_anything_is_written(trained_run):
    work, _ = trained_run
    before = (work / "runs" / "tiny" / "recipe.yaml").read_text()
    for override, named in [("run.seed=8", "changed: run.seed"), ("lora.rank=8", "changed: lora"),
                            ("distributed.zero_stage=3", "distributed.zero_stage: checkpoint_000000006")]:
        proc = run_cli("train", "recipe.yaml", "--set", override, "--no-progress", cwd=work)
        assert proc.returncode == 2 and named in proc.stderr, proc.stderr[-3000:]
    assert [(c.step, c.valid) for c in list_checkpoints(work / "runs" / "tiny")] == [(6, True)]
    assert (work / "runs" / "tiny" / "recipe.yaml").read_text() == before


def test_export_refuses_bad_paths(trained_run):
    work, _ = trained_run
    ckpt = work / "runs" / "tiny" / "checkpoint_000000006"
    cases = [(["export", str(ckpt), "-o", str(ckpt / "lora.safetensors")], "inside the checkpoint"),
             (["export", str(ckpt), "-o", str(work)], "is a folder"),
             (["export", str(work / "runs" / "tiny" / "checkpoint_000000099"), "-o", "x.safetensors"],
              "no checkpoint folder")]
    for args, message in cases:
        proc = cli_here(*args, cwd=work)
        assert proc.exit_code == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert inspect_checkpoint(ckpt).valid
