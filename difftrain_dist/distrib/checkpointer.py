"""The checkpointer: the one owner of a rank's checkpoints, deciding when to save, what a save
writes (DeepSpeed files, the LoRA file, the rank manifest), which old ones go, and where a run
continues from (choosing, re-sharding, restoring).

Re-running a recipe, `difftrain-dist resume RUN_DIR` and Ray restarting a crashed worker group all
come through `plan` and `restore`: rank 0 picks the newest valid checkpoint (setting aside newer,
invalid ones) and hands what it read to every rank, so the checkpoint is hashed once. Under Ray the
driver sets aside the invalid checkpoints it finds before the job starts and says so itself; rank
0's lines (after a restart mid-job) reach it through the progress board.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from difftrain_dist.config import Recipe
from difftrain_dist.distrib.checkpoint import (
    CheckpointInfo,
    apply_retention,
    check_compatible,
    checkpoint_name,
    choose_checkpoint,
    deepspeed_tag,
    set_aside_skipped,
    write_rank_manifest,
)
from difftrain_dist.distrib.ema import EMA_FILE, LoraEMA
from difftrain_dist.distrib.engine import apply_recipe_lr, load_engine_checkpoint
from difftrain_dist.distrib.export import write_checkpoint_lora
from difftrain_dist.distrib.metrics import peak_rss_mib
from difftrain_dist.distrib.reshard import resumed_state, to_universal, universal_dir
from difftrain_dist.distrib.state import TrainState, capture_rng, restore_rng
from difftrain_dist.distrib.trainee import Trainee

log = logging.getLogger("difftrain_dist")


@dataclass
class ResumePlan:
    """The checkpoint to continue from, or a fresh start when `checkpoint` is None."""

    checkpoint: CheckpointInfo | None = None
    load_dir: Path | None = None
    """Folder handed to `engine.load_checkpoint` (the checkpoint, or its universal conversion)."""

    @property
    def reshard(self) -> bool:
        """True when DeepSpeed must load a universal conversion (another world size, ZeRO ≥ 1)."""
        return self.checkpoint is not None and self.load_dir != self.checkpoint.path


class Checkpointer:
    """Every rank holds one; the methods are collectives (all ranks call them in the same order)."""

    def __init__(self, recipe: Recipe, session):
        self.recipe, self.session = recipe, session
        self.every, self.max_steps = recipe.checkpoint.every_n_steps, recipe.train.max_steps
        self.last: Path | None = None
        """The newest checkpoint this rank restored or saved."""
        self.known: dict[Path, CheckpointInfo] = {}
        """Checkpoints of the run validated so far (rank 0), so that retention reads none twice."""
        self.resume_identity = recipe.resume_identity()
        self.recipe_hash = recipe.recipe_hash()
        """The recipe's identity (it reads the model's configs and the shard index), once per run."""

    def plan(self) -> ResumePlan:
        """Where the run continues from. Rank 0 chooses (setting aside invalid newer checkpoints,
        each with a warning) and converts for a new world size; every rank gets the same plan.

        Raises:
            ValueError: the run cannot continue with this recipe (see `choose_checkpoint`), or the
                conversion for a new world size failed.
        """
        message: list = [None, None]  # [CheckpointInfo or None, error]
        if dist.get_rank() == 0:
            try:
                info, skipped = choose_checkpoint(self.recipe)
                for line in set_aside_skipped(skipped):
                    log.warning("%s", line)
                message[0] = info
            except ValueError as err:
                message[1] = str(err)
        dist.broadcast_object_list(message, src=0)
        if message[1]:
            raise ValueError(message[1])
        info: CheckpointInfo | None = message[0]
        if info is None:
            return ResumePlan()
        check_compatible(info, self.recipe, dist.get_world_size())  # the launcher's world size (torchrun)
        if info.world_size == dist.get_world_size() or self.recipe.distributed.zero_stage == 0:
            return ResumePlan(info, info.path)  # ZeRO-0 has no partitioned state: any world size loads it
        error = [None]
        if dist.get_rank() == 0:
            log.warning("re-sharding %s from %d to %d workers", info.path.name, info.world_size, dist.get_world_size())
            try:
                to_universal(info, self.recipe.run_dir)
            except ValueError as err:
                error[0] = str(err)
        dist.broadcast_object_list(error, src=0)
        if error[0]:
            raise ValueError(error[0])
        return ResumePlan(info, universal_dir(info, self.recipe.run_dir))

    def restore(self, trainee: Trainee, plan: ResumePlan, batches_per_epoch: int) -> TrainState:
        """Load the planned checkpoint into the trainee's engine and return this rank's state
        (fresh when there is none); `batches_per_epoch`: this rank's, at the current world size.

        Rank 0 says where it starts in a log record with `extra={"resume": {"checkpoint", "step"}}`
        (the driver of a Ray job counts these to tell a restarted worker group)."""
        global_rank, world_size = dist.get_rank(), dist.get_world_size()
        info = plan.checkpoint
        if info is None:
            if global_rank == 0:
                log.info("starting at step 0: no checkpoint to resume from",
                         extra={"resume": {"checkpoint": None, "step": 0}})
            return TrainState()
        load_engine_checkpoint(trainee.engine, plan.load_dir, deepspeed_tag(info.step), universal=plan.reshard)
        apply_recipe_lr(trainee.engine.lr_scheduler, self.recipe.train.lr)
        restore_ema(trainee, info)
        if global_rank < len(info.manifests):  # ranks new to a re-sharded run keep their fresh seeds
            restore_rng(info.manifests[global_rank].rng, trainee.noise_generator)
        self.last = info.path
        self.known[info.path] = info
        if global_rank == 0:
            name, step = info.path.name, info.step
            log.warning("resumed from %s (step %d)", name, step, extra={"resume": {"checkpoint": name, "step": step}})
        return resumed_state(info, global_rank, world_size, batches_per_epoch)

    def should_save(self, step: int, *, stop: bool) -> bool:
        """At every `checkpoint.every_n_steps`, at `train.max_steps`, and when a stop was asked for."""
        return stop or step % self.every == 0 or step == self.max_steps

    def after_step(self, trainee: Trainee, state: TrainState, loss: float, *, stop: bool) -> None:
        """All ranks, after each optimizer step: save when `should_save`."""
        if self.should_save(state.step, stop=stop):
            self.save(trainee, state, loss)

    def save(self, trainee: Trainee, state: TrainState, loss: float) -> Path:
        """DeepSpeed files, `lora.safetensors` (rank 0) and this rank's manifest into a local
        folder, handed to the session, which persists it as `run_dir/checkpoint_<step>`; then
        rank 0 applies `checkpoint.keep_last`. Returns the checkpoint folder."""
        recipe, global_rank = self.recipe, dist.get_rank()
        check_ranks_agree(trainee, state.step, recipe)
        local_dir = Path(tempfile.mkdtemp(prefix=f"ckpt-r{global_rank}-"))
        trainee.engine.save_checkpoint(str(local_dir), tag=deepspeed_tag(state.step),
                                       client_state={"step": state.step}, exclude_frozen_parameters=True)
        write_checkpoint_lora(trainee, recipe, state.step, local_dir, write=global_rank == 0)
        write_rank_manifest(local_dir, global_rank, self._manifest(trainee, state, loss))
        name = checkpoint_name(state.step)
        self.session.persist_checkpoint(local_dir, recipe.run_dir, name, {"step": state.step})
        self.last = recipe.run_dir / name
        if global_rank == 0:
            self.known[self.last] = CheckpointInfo(self.last, state.step, valid=True,
                                                   world_size=dist.get_world_size(), loss=loss)
            apply_retention(recipe.run_dir, recipe.checkpoint.keep_last, self.recipe_hash, self.known)
        return self.last

    def _manifest(self, trainee: Trainee, state: TrainState, loss: float) -> dict:
        recipe = self.recipe
        return {
            "step": state.step,
            "world_size": dist.get_world_size(),
            "zero_stage": recipe.distributed.zero_stage,
            "recipe_hash": self.recipe_hash,
            "resume_identity": self.resume_identity,
            "recipe": recipe.model_dump(mode="json"),
            "lora_configs": trainee.lora_config_dicts(),
            "loss": loss,
            "state": state.to_dict(),
            "rng": capture_rng(trainee.noise_generator),
            "host": socket.gethostname(),
            "node_id": self.session.node_id(),
            "pid": os.getpid(),
            "saved_at": time.time(),
            "peak_rss_mib": peak_rss_mib(),
        }


def restore_ema(trainee: Trainee, info: CheckpointInfo) -> None:
    """Load the checkpoint's moving average into `trainee.ema`; a checkpoint written without one
    (EMA turned on for the rest of a run) starts it from the weights just loaded."""
    saved = info.path / EMA_FILE
    if trainee.ema is None:
        if saved.is_file() and dist.get_rank() == 0:
            log.warning("%s holds a moving average, which this run (train.ema_decay unset) does not keep: its "
                        "LoRA files hold the trained weights", info.path.name)
        return
    if saved.is_file():
        trainee.ema.load(saved)
        return
    trainee.ema = LoraEMA(trainee.engine.module, trainee.ema.decay)
    if dist.get_rank() == 0:
        log.warning("%s holds no moving average: the EMA starts from its weights", info.path.name)


class RanksDisagreeError(RuntimeError):
    """Ranks hold different LoRA weights: what one rank would save is not what the others train."""


def check_ranks_agree(trainee: Trainee, step: int, recipe: Recipe) -> None:
    """Raise RanksDisagreeError when this rank's trained weights differ from rank 0's.

    Compares a fingerprint of every trainable tensor (float64 sum and sum of squares, in
    parameter order), all-gathered: one collective of 16 bytes per tensor and rank. Under ZeRO-3
    each rank holds a slice of the weights, which is not compared. Called before each save, so a
    checkpoint is never written from ranks that drifted apart.
    """
    world_size = dist.get_world_size()
    if world_size == 1 or recipe.distributed.zero_stage == 3:
        return
    params = [p.detach().double() for p in trainee.engine.module.parameters() if p.requires_grad]
    mine = torch.stack([torch.stack([p.sum(), (p * p).sum()]) for p in params]).to(trainee.device)
    gathered = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(gathered, mine)
    differ = [rank for rank, theirs in enumerate(gathered) if not torch.equal(theirs, gathered[0])]
    if differ:
        raise RanksDisagreeError(
            f"step {step}: ranks {differ} hold other LoRA weights than rank 0 (optimizer "
            f"{recipe.train.optimizer}, ZeRO-{recipe.distributed.zero_stage}); nothing of this step is saved")
