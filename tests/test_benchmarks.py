"""The benchmarks' own arithmetic, and that every benchmark module still imports (they run only
under `make bench`)."""

from __future__ import annotations

import importlib

import pytest

from benchmarks.__main__ import BENCHMARKS
from benchmarks.communication import GPU_COUNTS, LINKS_GBPS, paper_calculation
from benchmarks.step_overhead import paired_ratios


@pytest.mark.parametrize("name", [*BENCHMARKS, "gpu_check"])
def test_benchmark_modules_import(name):
    assert callable(importlib.import_module(f"benchmarks.{name}").main)


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
