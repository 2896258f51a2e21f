"""Optimizers and learning-rate schedules: chosen by name from maintained packages, each with
the ZeRO stages its statistics allow; on two gloo ranks every optimizer keeps the ranks equal
and resumes exactly, and Prodigy at its default stage matches one process on the same batch."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from difftrain_dist.config import Recipe, RecipeError, recipe_from_dict
from difftrain_dist.distrib.checkpoint import checkpoint_name
from difftrain_dist.distrib.checkpointer import RanksDisagreeError, check_ranks_agree
from difftrain_dist.distrib.engine import build_engine
from difftrain_dist.distrib.optimizers import OPTIMIZER_NAMES, OPTIMIZERS, build_lr_scheduler
from difftrain_dist.models import read_lora_file

from .gloo import raw_recipe, run_ranks, straight_and_split

LR = {"adamw": 1e-2, "adamw8bit": 1e-2, "lion": 1e-3, "prodigy": 1.0, "adafactor": 1e-2, "came": 1e-2}
"""A learning rate that moves the weights in 2 steps (Prodigy's is a factor of its own estimate)."""


def recipe(model: Path, shards: Path, storage: Path, **sections) -> Recipe:
    return recipe_from_dict(raw_recipe(model, shards, storage, **sections))


def test_each_optimizer_gets_the_stage_its_statistics_allow(tmp_path, tiny_sd15_model, photo_shards):
    stages = {name: recipe(tiny_sd15_model, photo_shards, tmp_path, train={"optimizer": name}).distributed.zero_stage
              for name in OPTIMIZER_NAMES}
    assert stages == {"adamw": 1, "adamw8bit": 1, "lion": 1, "prodigy": 0, "adafactor": 0, "came": 0}
    assert {name: spec.statistics for name, spec in OPTIMIZERS.items()} == {
        "adamw": "element", "adamw8bit": "block", "lion": "element", "prodigy": "global",
        "adafactor": "tensor", "came": "tensor"}
    with pytest.raises(RecipeError, match=r"train.optimizer: prodigy's step-size estimate sums over all parameters, .*"
                                          r"ZeRO-1 gives each rank a flat slice.*distributed.zero_stage: 0"):
        recipe(tiny_sd15_model, photo_shards, tmp_path, train={"optimizer": "prodigy"},
               distributed={"zero_stage": 1})
    with pytest.raises(RecipeError, match=r"adafactor's statistics are per tensor .*ZeRO-2"):
        recipe(tiny_sd15_model, photo_shards, tmp_path, train={"optimizer": "adafactor"},
               distributed={"zero_stage": 2})


def test_optimizer_args_are_checked_against_the_constructor(tmp_path, tiny_sd15_model, photo_shards):
    def load(**train):
        return recipe(tiny_sd15_model, photo_shards, tmp_path, train=train)

    assert load(optimizer="prodigy", optimizer_args={"d_coef": 2.0}).train.optimizer_args == {"d_coef": 2.0}
    with pytest.raises(RecipeError, match=r"train.optimizer_args.d_cef: prodigy takes no such argument; "
                                          r"it takes \[.*'d_coef'.*\]"):
        load(optimizer="prodigy", optimizer_args={"d_cef": 2.0})
    with pytest.raises(RecipeError, match=r"train.optimizer_args.lr: set train.lr instead"):
        load(optimizer_args={"lr": 1.0})
    with pytest.raises(RecipeError, match=r"train.betas: came takes no pair of betas"):
        load(optimizer="came", betas=[0.9, 0.99])
    assert load(optimizer="came", optimizer_args={"betas": [0.9, 0.99, 0.999]}).train.optimizer_args["betas"]
    with pytest.raises(RecipeError, match=r"train.optimizer_args: adamw refuses \{.*'eps': 'abc'.*\}: TypeError"):
        load(optimizer_args={"eps": "abc"})  # a value of the wrong type fails as the recipe loads
    with pytest.raises(RecipeError, match=r"optimizer_args.relative_step: Adafactor would then choose its own lr"):
        load(optimizer="adafactor", optimizer_args={"relative_step": True})
    with pytest.raises(RecipeError, match=r"train.optimizer: .*'sgd'"):
        load(optimizer="sgd")


@pytest.mark.parametrize("name", ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                                  "polynomial"])
def test_learning_rate_schedules_follow_diffusers(name):
    warmup, steps = 4, 24
    factors = {
        "constant": lambda s: 1.0,
        "constant_with_warmup": lambda s: min(1.0, s / warmup),
        "linear": lambda s: s / warmup if s < warmup else (steps - s) / (steps - warmup),
        "cosine": lambda s: s / warmup if s < warmup else 0.5 * (
            1 + math.cos(math.pi * (s - warmup) / (steps - warmup))),
        # 2 hard restarts: the cosine falls to 0 twice, starting over halfway
        "cosine_with_restarts": lambda s: s / warmup if s < warmup else 0.5 * (
            1 + math.cos(math.pi * ((2 * (s - warmup) / (steps - warmup)) % 1.0))),
        "polynomial": lambda s: s / warmup if s < warmup else ((steps - s) / (steps - warmup)) ** 2 * (1 - 1e-7) + 1e-7,
    }
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_lr_scheduler(optimizer, name, warmup_steps=warmup, max_steps=steps, num_cycles=2, power=2.0)
    got = []
    for _ in range(steps):
        got.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    want = [factors[name](s) for s in range(steps)]
    assert got == pytest.approx(want, abs=1e-9)


def _perturbed_rank_is_caught() -> None:
    rank = dist.get_rank()
    torch.manual_seed(0)
    module = torch.nn.Linear(3, 2)
    trainee = SimpleNamespace(engine=SimpleNamespace(module=module), device=torch.device("cpu"))
    settings = SimpleNamespace(train=SimpleNamespace(optimizer="adamw"), distributed=SimpleNamespace(zero_stage=1))
    check_ranks_agree(trainee, 1, settings)  # equal: passes
    if rank == 1:
        with torch.no_grad():
            module.weight[0, 0] += 1e-6
    with pytest.raises(RanksDisagreeError, match=r"step 2: ranks \[1\] hold other LoRA weights than rank 0 "
                                                 r"\(optimizer adamw, ZeRO-1\)"):
        check_ranks_agree(trainee, 2, settings)


def _every_optimizer_on_two_ranks(raws: dict[str, dict], storage: Path) -> None:
    """One pair of ranks for every optimizer (one start-up, not six), then the drift check."""
    for name, raw in raws.items():
        straight_and_split(raw, storage / name)
    _perturbed_rank_is_caught()
    if dist.get_rank() == 0:
        (storage / "drift-checked").touch()


@pytest.fixture(scope="module")
def every_optimizer(tmp_path_factory, tiny_sd15_model, photo_shards) -> Path:
    """Every optimizer on 2 gloo ranks: "straight" 4 steps, "split" 2 then on to 4 (`straight_and_split`)."""
    storage = tmp_path_factory.mktemp("optimizers")
    raws = {name: raw_recipe(tiny_sd15_model, photo_shards, storage / name, train={"optimizer": name, "lr": LR[name]},
                             distributed={"num_workers": 2}) for name in OPTIMIZER_NAMES}
    run_ranks(_every_optimizer_on_two_ranks, 2, raws, storage)
    return storage


def test_a_rank_that_drifted_stops_the_save(every_optimizer):
    assert (every_optimizer / "drift-checked").is_file()  # `_perturbed_rank_is_caught` passed on both ranks


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_every_optimizer_keeps_two_ranks_equal_and_resumes_exactly(name, every_optimizer):
    runs = every_optimizer / name
    want, got, start = (read_lora_file(runs / run / "o" / checkpoint_name(step) / "lora.safetensors")[0]
                        for run, step in (("straight", 4), ("split", 4), ("straight", 2)))
    assert want.keys() == got.keys() and want
    assert max(float((want[k] - got[k]).abs().max()) for k in want) <= 1e-6
    assert max(float((want[k] - start[k]).abs().max()) for k in want) > 1e-6, "the optimizer did not train"


def _prodigy_steps(raw: dict, out: Path, steps: int) -> None:
    """Prodigy on a linear model through the worker's engine: each rank takes its share of the
    same 4 samples, so every world size sees the same global batch."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    engine, _, _ = build_engine(model, recipe_from_dict(raw))
    inputs = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    targets = torch.randn(4, 4, generator=torch.Generator().manual_seed(2))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    for _ in range(steps):
        mine = slice(rank * 4 // world_size, (rank + 1) * 4 // world_size)
        loss = torch.nn.functional.mse_loss(engine(inputs[mine]), targets[mine])
        engine.backward(loss)
        engine.step()
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.empty_like(weights) for _ in range(world_size)]
    dist.all_gather(gathered, weights)
    assert all(torch.equal(g, gathered[0]) for g in gathered)
    if rank == 0:
        torch.save({"weights": weights, "d": engine.optimizer.param_groups[0]["d"]}, out)


def test_prodigy_at_its_default_stage_matches_one_process_on_the_same_batch(tmp_path, tiny_sd15_model, photo_shards):
    results = {}
    for world_size in (1, 2):
        raw = raw_recipe(tiny_sd15_model, photo_shards, tmp_path, train={"optimizer": "prodigy", "lr": 1.0},
                         data={"micro_batch_size": 4 // world_size}, distributed={"num_workers": world_size})
        run_ranks(_prodigy_steps, world_size, raw, tmp_path / f"w{world_size}.pt", 5)
        results[world_size] = torch.load(tmp_path / f"w{world_size}.pt")
    one, two = results[1], results[2]
    assert one["d"] > 1e-6, "Prodigy's step-size estimate never left d0"
    # The same sums in another order (an all-reduce of two halves): float32 rounding only.
    assert two["d"] == pytest.approx(one["d"], rel=1e-5)
    torch.testing.assert_close(two["weights"], one["weights"], rtol=0, atol=1e-6)


def test_resuming_keeps_the_optimizer_state_it_can_continue(tmp_path, tiny_sd15_model, photo_shards):
    from types import SimpleNamespace as Info

    from difftrain_dist.distrib.checkpoint import check_compatible

    def saved(optimizer: str, stage: int, world_size: int, **train):
        written = recipe(tiny_sd15_model, photo_shards, tmp_path, train={"optimizer": optimizer, **train},
                         distributed={"zero_stage": stage})
        manifest = Info(recipe=written.model_dump(mode="json"), zero_stage=stage)
        return Info(manifests=[manifest], world_size=world_size, path=tmp_path / "checkpoint_000000002")

    lion = recipe(tiny_sd15_model, photo_shards, tmp_path, train={"optimizer": "lion"},
                  distributed={"zero_stage": 1, "num_workers": 2})
    check_compatible(saved("lion", 1, 2), lion)  # the same settings: fine
    with pytest.raises(ValueError, match=r"train.weight_decay: checkpoint_000000002 holds the optimizer state of "
                                         r"train.weight_decay=0.1; set them back"):
        check_compatible(saved("lion", 1, 2, weight_decay=0.1), lion)
    with pytest.raises(ValueError, match=r"train.optimizer: .* state of train.optimizer='adamw'"):
        check_compatible(saved("adamw", 2, 2), lion)  # named before the stage it also changes
    with pytest.raises(ValueError, match=r"distributed.num_workers: .*written by 4 workers; .* AdamW's state only, "
                                         r"not lion's; continue with 4 workers"):
        check_compatible(saved("lion", 1, 4), lion)
    prodigy = recipe(tiny_sd15_model, photo_shards, tmp_path, train={"optimizer": "prodigy", "lr": 1.0},
                     distributed={"num_workers": 2})
    check_compatible(saved("prodigy", 0, 4, lr=1.0), prodigy)  # ZeRO-0 needs no re-sharding


def test_a_missing_optimizer_package_is_named_when_the_recipe_loads(tmp_path, tiny_sd15_model, photo_shards,
                                                                    monkeypatch):
    from difftrain_dist.distrib.optimizers import OptimizerSpec

    monkeypatch.setitem(OPTIMIZERS, "lion", OptimizerSpec("no_such_lion_module:Lion", "lion-pytorch", "element"))
    with pytest.raises(RecipeError, match=r"train.optimizer: lion needs the lion-pytorch package .*"
                                          r"pip install lion-pytorch, or install difftrain-dist\[optimizers\]"):
        recipe(tiny_sd15_model, photo_shards, tmp_path, train={"optimizer": "lion"})
