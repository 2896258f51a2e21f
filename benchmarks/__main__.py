"""`python -m benchmarks` (make bench): run every benchmark, each in a fresh process (DeepSpeed
keeps process-group state between engines), print its figures and how long it took, then a
summary table against the targets; JSON results land in build/bench/ (summary.json for the
table). The GPU check runs too when a CUDA GPU is present.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import torch
from rich.console import Console
from rich.table import Table

from benchmarks.common import RESULTS, machine

BENCHMARKS: dict[str, list[str]] = {
    "data_loader": ["data_loader"],
    "checkpoint": ["checkpoint"],
    "step_overhead": ["step_overhead"],
    "step_overhead_sdxl": ["step_overhead", "--layout", "sdxl"],
    "communication": ["communication"],
    "scaling": ["scaling"],
    "embedded_start": ["embedded_start"],
}
"""Result name (build/bench/NAME.json) → benchmark module under benchmarks/ and its arguments."""


def summary_rows(results: dict[str, dict]) -> list[dict[str, str]]:
    """One row per figure of the benchmarks in `results` (benchmark name → its JSON result):
    what was measured, the figure, the target ("" for none) and "met", "missed" or ""."""
    rows: list[dict[str, str]] = []

    def row(what: str, measured: str, target: str = "", met: bool | None = None) -> None:
        rows.append({"what": what, "measured": measured, "target": target,
                     "verdict": "" if met is None else "met" if met else "missed"})

    if r := results.get("data_loader"):
        row(f"data loader, {r['resolution']} px, samples/s per core: shard stream vs PIL folder",
            f"{r['ours_samples_per_s_per_core']:.1f} vs {r['pil_folder_samples_per_s_per_core']:.1f}, "
            f"ratio {r['ratio']:.2f}", ">= 1.0", r["ratio"] >= 1.0)
    if r := results.get("checkpoint"):
        share = r["save_fraction_at_default_interval"]
        row(f"checkpoint save, share of run time at every_n_steps={r['default_every_n_steps']}",
            f"{r['save_s'] * 1e3:.0f} ms save, {r['step_s'] * 1e3:.0f} ms step: {share:.2%}", "<= 2 %", share <= 0.02)
        row(f"consolidation, {r['lora_params'] / 1e6:.1f}M-parameter LoRA",
            f"{r['consolidate_s']:.2f} s, {r['lora_file_mib']:.1f} MiB")
    if r := results.get("step_overhead"):
        q1, q3 = r["paired_ratio_quartiles"]
        row(f"step time, worker loop (ZeRO-{r['zero_stage']}) vs bare PyTorch, mean of {r['steps']}",
            f"{r['ours_step_s'] * 1e3:.1f} vs {r['bare_step_s'] * 1e3:.1f} ms, ratio {r['ratio']:.2f} "
            f"(step by step: median {r['paired_ratio_median']:.2f}, quartiles {q1:.2f}-{q3:.2f})",
            "<= 1.10", r["ratio"] <= 1.10)
    if r := results.get("step_overhead_sdxl"):
        q1, q3 = r["paired_ratio_quartiles"]
        row(f"SDXL-layout step time, full depth, worker loop (ZeRO-{r['zero_stage']}): speedup vs bare "
            f"eager, median of {r['steps']}",
            f"{r['ours_median_step_s'] * 1e3:.0f} vs {r['bare_median_step_s'] * 1e3:.0f} ms, "
            f"{r['speedup_vs_bare_eager']:.2f}x (ours/bare step by step: quartiles {q1:.2f}-{q3:.2f})",
            ">= 1.05", r["speedup_vs_bare_eager"] >= 1.05)
    if r := results.get("communication"):
        row(f"communication per step, {r['world_size']} ranks, G = {r['lora_grad_bytes'] / 1e6:.3f} MB",
            f"all-reduce {r['all_reduce_over_g']:.2f} G, all-gather {r['all_gather_over_g']:.2f} G, "
            f"+{r['stats_all_reduce_bytes']} B")
    if r := results.get("scaling"):
        one, two = r["one_worker"], r["two_workers"]
        row("scaling, samples/s at 1 and 2 workers",
            f"{one['samples_per_s']:.1f} -> {two['samples_per_s']:.1f}, efficiency {r['efficiency']:.2f}")
        rss = ", ".join(f"{m:.0f}" for m in one["peak_rss_mib"] + two["peak_rss_mib"])
        row("peak RSS per worker (1 worker; 2 workers), MiB", rss)
    if r := results.get("embedded_start"):
        embedded_start_rows(r, row)
    if r := results.get("gpu_check"):
        for arch in ("sdxl", "flux"):
            if a := r.get(arch):
                row(f"GPU check {arch}, batch {a['batch']}, {a['resolution']} px: ours vs plain samples/s",
                    f"{a['ours']['samples_per_s']:.2f} vs {a['plain']['samples_per_s']:.2f}, "
                    f"ratio {a['speed_ratio']:.2f}")
    return rows


EMBEDDED_FIGURES = {"time_to_step_1": "time until step 1 is done", "wall": "end-to-end wall",
                    "steady_samples_per_s": "steady samples/s, steps 20-60", "peak_pss": "peak PSS of the process tree"}


def embedded_start_rows(r: dict, row) -> None:
    """benchmarks/embedded_start.py: each figure of ours (1 worker) / the plain script under
    accelerate launch, judged; then the same against a bare `python -m`, and compilers seen."""
    for against, judged in (("plain_accelerate", True), ("plain_python", False)):
        table = r["ratios"][f"ours_1_worker_vs_{against}"]
        launcher = "accelerate launch" if judged else "python -m"
        for name, what in EMBEDDED_FIGURES.items():
            f, rounds = table[name], r["memory_rounds"] if name == "peak_pss" else r["rounds"]
            row(f"embedded start, {what}: ours (1 worker) / plain LoRA script ({launcher})",
                f"{f['median']:.2f} ({f['min']:.2f}-{f['max']:.2f}, {rounds} round{'s' * (rounds != 1)})",
                r["targets"][name] if judged else "", r["met"][name] if judged else None)
    row("embedded start, compilers run during the runs", ", ".join(r["compilers_seen"]) or "none", "none",
        not r["compilers_seen"])


def print_summary(rows: list[dict[str, str]]) -> None:
    table = Table(title=f"make bench: {machine()}", show_lines=False)
    for column in ("what", "measured", "target", "verdict"):
        table.add_column(column)
    for r in rows:
        table.add_row(r["what"], r["measured"], r["target"], r["verdict"])
    Console(width=160).print(table)


if __name__ == "__main__":
    if torch.cuda.is_available():
        BENCHMARKS["gpu_check"] = ["gpu_check"]
    failed, results = [], {}
    for name, (module, *args) in BENCHMARKS.items():
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", *args], capture_output=True, text=True)
        figures = [line for line in proc.stdout.splitlines() if line.strip()]
        print("\n".join(figures[-12:]))
        print(f"  ({name}: {time.perf_counter() - start:.0f} s)", flush=True)
        if proc.returncode != 0:
            failed.append(name)
            print(proc.stderr[-3000:], file=sys.stderr)
        else:
            results[name] = json.loads((RESULTS / f"{name}.json").read_text())
    rows = summary_rows(results)
    print_summary(rows)
    (RESULTS / "summary.json").write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))
    if failed:
        sys.exit(f"benchmarks failed: {', '.join(failed)}")
