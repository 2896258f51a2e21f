"""`RUN/loss.png`: the loss of every step with a smoothed line, the learning rate on a second axis."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from difftrain_dist.distrib.metrics import read_metrics

LOSS_PLOT = "loss.png"
DEFAULT_SMOOTHING = 0.9


def smooth(values: Sequence[float], weight: float = DEFAULT_SMOOTHING) -> list[float]:
    """Exponential moving average with bias correction, as TensorBoard's scalar smoothing
    (tensorboard/plugins/scalar/vz_line_chart: `last = last * w + (1 - w) * v`, divided by
    `1 - w ** n`), so the first points are not pulled towards 0. `weight` in [0, 1): 0 is no
    smoothing. The dashboard's charts use the same formula."""
    if not 0 <= weight < 1:
        raise ValueError(f"smoothing weight must be in [0, 1), got {weight}")
    out, last = [], 0.0
    for n, value in enumerate(values, start=1):
        last = last * weight + (1 - weight) * value
        out.append(last / (1 - weight**n))
    return out


def plot_loss(run_dir: Path, out: Path | None = None, *, smoothing: float = DEFAULT_SMOOTHING,
              entries: list[dict] | None = None) -> Path:
    """Draw `run_dir/metrics.jsonl` into a PNG (default `run_dir/loss.png`, replaced atomically):
    loss per optimizer step (thin), its smoothed line (`smooth`), the learning rate on the right axis.
    `entries`: the file's entries when the caller has read them already.

    Raises:
        ValueError: the run has no metrics yet, or `smoothing` is outside [0, 1).
    """
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    run_dir = Path(run_dir)
    entries = [e for e in (read_metrics(run_dir) if entries is None else entries) if e.get("loss") is not None]
    if not entries:
        raise ValueError(f"{run_dir} has no metrics.jsonl steps to plot yet")
    steps = [e["step"] for e in entries]
    loss = [e["loss"] for e in entries]
    fig = Figure(figsize=(8, 4.5), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.plot(steps, loss, color="tab:blue", alpha=0.3, linewidth=1, label="loss")
    ax.plot(steps, smooth(loss, smoothing), color="tab:blue", linewidth=2, label=f"loss, smoothed ({smoothing:g})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    lines = ax.get_lines()
    if any(e.get("lr") is not None for e in entries):
        lr_ax = ax.twinx()
        lr_ax.plot(steps, [e.get("lr") for e in entries], color="tab:orange", linewidth=1.5, label="lr")
        lr_ax.set_ylabel("learning rate")
        lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        lines += lr_ax.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], loc="best", framealpha=0.7)
    ax.set_title(f"{run_dir.name}: {len(steps)} steps, last loss {loss[-1]:.4g}")
    out = Path(out) if out is not None else run_dir / LOSS_PLOT
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    fig.savefig(tmp, format="png")
    os.replace(tmp, out)
    return out
