"""The end of a run, the same for both launchers (Ray Train and torchrun/srun)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from difftrain_dist.config import Recipe
from difftrain_dist.distrib.checkpoint import LORA_FILE, find_resume_checkpoint, inspect_checkpoint
from difftrain_dist.distrib.lossplot import plot_loss
from difftrain_dist.distrib.metrics import read_metrics


@dataclass
class TrainingResult:
    """What a run left behind."""

    lora_path: Path
    """`output_dir/<name>.safetensors`; for a preempted run, the last checkpoint's LoRA."""
    checkpoint: Path
    step: int
    preempted: bool
    """True when a stop signal ended the run before `train.max_steps` (re-run to continue)."""


def finish_run(recipe: Recipe, checkpoint: Path | None, *, stopped_early: bool) -> TrainingResult:
    """Validate the run's last checkpoint (once) and, unless the run stopped before
    `train.max_steps`, write `output_dir/<name>.safetensors` from it; a stopped run leaves that
    name alone and points to the checkpoint's own `lora.safetensors`. Draws `run_dir/loss.png`
    from the run's metrics.

    `checkpoint`: the newest checkpoint the workers saved or resumed from; None (a job that had
    nothing to train, or whose workers could not say) takes the run folder's newest valid one.

    Raises:
        RuntimeError: the run left no valid checkpoint.
    """
    from difftrain_dist.distrib.export import export_valid_checkpoint  # torch: not on a driver that only reads results

    if checkpoint is None:
        final, _ = find_resume_checkpoint(recipe.run_dir, recipe.recipe_hash())
        if final is None:
            raise RuntimeError(f"training finished but {recipe.run_dir} holds no valid checkpoint")
    else:
        final = inspect_checkpoint(checkpoint, recipe.recipe_hash())
        if not final.valid:
            raise RuntimeError(f"training finished but its last checkpoint {checkpoint} is not valid: {final.reason}")
    preempted = stopped_early and final.step < recipe.train.max_steps
    lora_path = final.path / LORA_FILE
    if not preempted:
        lora_path = export_valid_checkpoint(final, recipe.run.output_dir / f"{recipe.run.name}.safetensors")
    if entries := [e for e in read_metrics(recipe.run_dir) if e.get("loss") is not None]:
        plot_loss(recipe.run_dir, entries=entries)
    return TrainingResult(lora_path=lora_path, checkpoint=final.path, step=final.step, preempted=preempted)
