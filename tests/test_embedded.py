"""The embedded default as a first user meets it: `make demo`'s commands print the CLI's own
lines only (Ray's, DeepSpeed's and the libraries' output stays in Ray's log files; `--verbose`
shows it), and the local cluster its training command starts serves no dashboard: no web UI, no
dashboard module processes."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from .procs import assert_no_processes_left, cli, marked_env, marked_processes

DEMO_RECIPE = Path(__file__).resolve().parents[1] / "configs" / "demo_sd15.yaml"
OUR_LINES = [
    r"run demo-sd15: 2 worker\(s\), ZeRO-1, 30 steps, checkpoints in \S+/build/demo/runs/demo-sd15",
    r"step \d+/30  loss \d+\.\d+  \d+\.\d+ samples/s  eta \d+:\d\d:\d\d",
    r"samples at step \d+: \S+/samples/step_\d+\.png",
    r"LoRA written: \S+/build/demo/outputs/demo-sd15\.safetensors \(step 30, from \S+checkpoint_000000030\)",
]
"""Every line the demo's training command may print (captured, so progress comes as lines)."""


def demo_folder(root: Path, model: Path, shards: Path) -> Path:
    """A working folder laid out as `make demo` leaves the repository before it trains."""
    (root / "build" / "demo").mkdir(parents=True)
    shutil.copytree(model, root / "build" / "demo" / "tiny-sd15")
    shutil.copytree(shards, root / "build" / "demo" / "shards")
    return root


def watch(proc: subprocess.Popen, mark: str) -> set[str]:
    """The command lines of the run's processes, polled until the driver exits."""
    seen: set[str] = set()
    while proc.poll() is None:
        seen.update(line.split(" ", 1)[1] for line in marked_processes(mark, width=100_000))
        time.sleep(0.3)
    return seen


@pytest.mark.slow
def test_the_demo_prints_our_lines_only_and_starts_no_dashboard(tmp_path, tiny_sd15_model, photo_shards):
    work = demo_folder(tmp_path, tiny_sd15_model, photo_shards)
    env, mark = marked_env()
    proc = subprocess.Popen(cli("train", str(DEMO_RECIPE)), cwd=work, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    with proc:
        processes = watch(proc, mark)
        output = proc.stdout.read()
    assert proc.returncode == 0, output[-4000:]
    lines = [line for line in output.splitlines() if line.strip()]
    strange = [line for line in lines if not any(re.fullmatch(pattern, line) for pattern in OUR_LINES)]
    assert not strange, "lines that are not the CLI's own:\n" + "\n".join(strange)
    assert sum(line.startswith("step ") for line in lines) >= 3 and lines[-1].startswith("LoRA written")
    assert sum(line.startswith("samples at step ") for line in lines) == 3  # steps 10, 20, 30
    assert any("RankActor" in p for p in processes), processes  # the ranks ran as Ray actors
    modules = [p for p in processes if "ray-dashboard-" in p or "dashboard/modules" in p]
    assert not modules, modules  # the full dashboard starts one process per module
    heads = [p for p in processes if "dashboard/dashboard.py" in p]  # Ray's head API server
    assert all("--disable-frontend" in p and "--modules-to-load=UsageStatsHead" in p for p in heads), heads
    assert_no_processes_left(mark)


@pytest.mark.slow
def test_the_demos_other_commands_print_their_own_line_only(tmp_path, tiny_sd15_model):
    """`models init-tiny` and `sample` load diffusers models (accelerate then imports DeepSpeed,
    which announced its CPU fallback) and showed the libraries' loading bars."""
    for args, said in [(("models", "init-tiny", "sd15", "tiny"), "tiny sd15 pipeline saved to tiny"),
                       (("sample", str(tiny_sd15_model), "a photo", "-o", "s.png", "--steps", "2"), "wrote s.png")]:
        proc = subprocess.run(cli(*args), cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert (proc.stdout + proc.stderr).split() == said.split(), proc.stdout + proc.stderr


@pytest.mark.slow
def test_verbose_shows_the_workers_own_output(tmp_path, tiny_sd15_model, photo_shards):
    recipe = yaml.safe_load(DEMO_RECIPE.read_text())
    recipe.update(model={"arch": "sd15", "path": str(tiny_sd15_model)}, sample={})
    recipe["data"]["shards"] = str(photo_shards)
    recipe["train"].update(max_steps=2, lr_warmup_steps=0)
    recipe["distributed"]["num_workers"] = 1
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    quiet = subprocess.run(cli("train", "r.yaml"), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert quiet.returncode == 0, quiet.stderr[-4000:]
    shutil.rmtree(tmp_path / "build")
    loud = subprocess.run(cli("train", "r.yaml", "--verbose"), cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert loud.returncode == 0, loud.stderr[-4000:]
    actor_lines = [line for line in loud.stderr.splitlines() if "(RankActor pid=" in line]
    assert actor_lines, loud.stderr[-4000:]  # Ray prefixes what the rank actor's process printed
    assert "(RankActor pid=" not in quiet.stderr + quiet.stdout


SHM_OP_CHECK = """
import os
os.environ["DS_ACCELERATOR"] = "cpu"
from difftrain_dist.distrib.engine import skip_unused_ops
skip_unused_ops()
import deepspeed.ops
from deepspeed.comm.torch import build_shm_op
assert build_shm_op() is None, "the shm op was built"
assert "deepspeed_not_implemented" not in deepspeed.ops.__compatible_ops__, "DeepSpeed probed every op"
"""


def test_deepspeed_neither_builds_nor_probes_ops_at_run_time():
    """The CPU backend's start builds no shm op, and nothing probes the op table (a probe runs gcc)."""
    proc = subprocess.run([sys.executable, "-c", SHM_OP_CHECK], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_verbose_workers_get_the_libraries_defaults_but_what_the_user_set(monkeypatch):
    from difftrain_dist import quiet

    monkeypatch.setattr(quiet, "_applied", set())
    for name in quiet.QUIET_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DIFFUSERS_VERBOSITY", "info")  # the user's
    quiet.apply_quiet_env()
    assert quiet.quiet_env() == {**quiet.QUIET_ENV, "DIFFUSERS_VERBOSITY": "info"}
    assert quiet.library_env() == {**quiet.LIBRARY_DEFAULTS, "DIFFUSERS_VERBOSITY": "info"}
