"""The benchmarks' own arithmetic, and that every benchmark module still imports (they run only
under `make bench`)."""

from __future__ import annotations

import importlib

import pytest

from benchmarks.__main__ import BENCHMARKS
from benchmarks.communication import GPU_COUNTS, LINKS_GBPS, paper_calculation
from benchmarks.embedded_start import FIGURES, ratios
from benchmarks.step_overhead import paired_ratios


@pytest.mark.parametrize("module", sorted({module for module, *_ in BENCHMARKS.values()} | {"gpu_check"}))
def test_benchmark_modules_import(module):
    assert callable(importlib.import_module(f"benchmarks.{module}").main)


def test_ring_traffic_is_three_times_g_times_n_minus_one_over_n():
    gradient_bytes = 92.9e6
    rows = paper_calculation(gradient_bytes)
    assert len(rows) == len(GPU_COUNTS) * len(LINKS_GBPS)
    eight = [r for r in rows if r["gpus"] == 8]
    assert all(r["sent_mb"] == pytest.approx(3 * 7 / 8 * 92.9) for r in eight)
    fast = min(eight, key=lambda r: r["ms"])
    assert fast["ms"] == pytest.approx(3 * 7 / 8 * 92.9e6 * 8 / 400e9 * 1e3)
    assert 0 < fast["share_of_step"] < min(r["share_of_step"] for r in eight if r is not fast)


def test_paired_ratios_pair_rounds():
    assert paired_ratios([2.0, 3.0], [1.0, 2.0]) == [2.0, 1.5]
    with pytest.raises(ValueError):
        paired_ratios([1.0], [1.0, 2.0])


def test_embedded_start_pairs_rounds_and_skips_figures_a_round_lacks():
    ours = [{"wall_s": 4.0, "peak_pss_mib": 900.0}, {"wall_s": 3.0}]
    plain = [{"wall_s": 2.0, "peak_pss_mib": 600.0}, {"wall_s": 3.0}]
    assert ratios(ours, plain) == {"wall": {"median": 1.5, "min": 1.0, "max": 2.0},
                                   "peak_pss": {"median": 1.5, "min": 1.5, "max": 1.5}}


def test_summary_rows_compare_each_figure_with_its_target():
    from benchmarks.__main__ import summary_rows

    results = {
        "data_loader": {"resolution": 512, "ours_samples_per_s_per_core": 90.0,
                        "pil_folder_samples_per_s_per_core": 100.0, "ratio": 0.9},
        "checkpoint": {"save_fraction_at_default_interval": 0.001, "default_every_n_steps": 500, "save_s": 0.05,
                       "step_s": 0.06, "lora_params": 23224320, "consolidate_s": 0.7, "lora_file_mib": 88.7},
        "step_overhead": {"zero_stage": 1, "steps": 60, "ours_step_s": 0.055, "bare_step_s": 0.05, "ratio": 1.1,
                          "paired_ratio_median": 1.09, "paired_ratio_quartiles": [1.0, 1.2]},
        "step_overhead_sdxl": {"zero_stage": 1, "steps": 40, "ours_median_step_s": 0.6, "bare_median_step_s": 0.59,
                               "speedup_vs_bare_eager": 0.98, "paired_ratio_quartiles": [1.0, 1.05]},
    }
    spread = {"median": 1.4, "min": 1.2, "max": 1.7}
    results["embedded_start"] = {
        "rounds": 3, "memory_rounds": 1, "ratios": {f"ours_1_worker_vs_{plain}": dict.fromkeys(FIGURES, spread)
                                for plain in ("plain_accelerate", "plain_python")},
        "targets": {"time_to_step_1": "<= 2.0", "wall": "<= 1.5", "steady_samples_per_s": ">= 1.5",
                    "peak_pss": "<= 2.0"},
        "met": {"time_to_step_1": True, "wall": True, "steady_samples_per_s": False, "peak_pss": True},
        "compilers_seen": ["gcc"]}
    rows = summary_rows(results)
    verdicts = {r["what"].split(",")[0]: r["verdict"] for r in rows if not r["what"].startswith("embedded")}
    assert verdicts == {"data loader": "missed", "checkpoint save": "met", "consolidation": "",
                        "step time": "met", "SDXL-layout step time": "missed"}
    embedded = [(r["what"].split(":")[0], r["measured"], r["verdict"])
                for r in rows if r["what"].startswith("embedded")]
    assert embedded[2] == ("embedded start, steady samples/s, steps 20-60", "1.40 (1.20-1.70, 3 rounds)", "missed")
    assert [v for _, _, v in embedded] == ["met", "met", "missed", "met", "", "", "", "", "missed"]
    assert embedded[3][1] == "1.40 (1.20-1.70, 1 round)"  # memory comes from its own rounds
    assert summary_rows({}) == []
