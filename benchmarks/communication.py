"""Communication volume: the collectives of one optimizer step and their message sizes, measured
with DeepSpeed's comms logger on a real 2-rank gloo run (tiny SD1.5, LoRA r16, the recipe's
default ZeRO-1, micro-batch 2), then the cost of the same pattern for an SDXL-sized LoRA on 8-64
GPUs, worked out on paper.

Only LoRA tensors travel. Per step ZeRO-1 all-reduces the gradients (G bytes) and all-gathers the
updated optimizer partitions (G bytes in all, G/N from each rank). With ring algorithms every GPU
sends 2(N-1)/N * G for the all-reduce and (N-1)/N * G for the all-gather (Patarasuk & Yuan 2009),
3(N-1)/N * G in all; the time per step is that over the per-GPU network bandwidth. The table
takes G in fp32 (an upper bound: on GPU DeepSpeed's torch_autocast reduces Linear gradients in
bf16).

    python -m benchmarks.communication
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.checkpoint import SdxlSizedLora
from benchmarks.common import free_port, tiny_assets, write_result

STEPS = 4
WORLD = 2
GPU_COUNTS = (8, 16, 32, 64)
LINKS_GBPS = {"400 Gb/s per GPU (8 NICs per node)": 400, "100 Gb/s per node, 8 GPUs sharing it": 100 / 8}
STEP_S_SDXL_H200 = 0.45
"""One SDXL batch-4 step on an H200 (benchmarks/gpu_check.py, plain loop)."""


def _rank(rank: int, root: Path, model: Path, shards: Path, port: int, out: Path) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    import deepspeed.comm.comm as ds_comm

    from difftrain_dist.config import recipe_from_dict
    from difftrain_dist.data_shards import ShardStream
    from difftrain_dist.distrib import engine
    from difftrain_dist.distrib.step import reduce_step_stats, train_step
    from difftrain_dist.distrib.trainee import setup_trainee

    plain_config = engine.deepspeed_config

    def with_comms_logger(recipe, **kwargs):
        return {**plain_config(recipe, **kwargs), "comms_logger": {"enabled": True, "prof_all": True}}

    engine.deepspeed_config = with_comms_logger
    recipe = recipe_from_dict({
        "run": {"name": "comm", "storage_path": str(root / "runs")},
        "model": {"path": str(model)},
        "data": {"shards": str(shards), "micro_batch_size": 2},
        "train": {"max_steps": 100},
        "distributed": {"num_workers": WORLD},
    })
    trainee = setup_trainee(recipe, rank)
    stream = ShardStream(shards, micro_batch_size=2, global_rank=rank, world_size=WORLD, seed=0)
    batches = iter(stream)
    for _ in range(2):  # warm-up: buffers are set up on the first steps
        reduce_step_stats(train_step(trainee, batches, 1), False)
    ds_comm.comms_logger.comms_dict.clear()
    for _ in range(STEPS):
        reduce_step_stats(train_step(trainee, batches, 1), False)
    per_op = {name: sum(size * record[0] for size, record in sizes.items()) / STEPS
              for name, sizes in ds_comm.comms_logger.comms_dict.items()}
    lora = sum(p.numel() for p in trainee.engine.module.parameters() if p.requires_grad)
    if rank == 0:
        out.write_text(json.dumps({"bytes_per_step_by_op": per_op, "lora_params": lora}))
    dist.destroy_process_group()


def paper_calculation(gradient_bytes: float) -> list[dict]:
    """Per-GPU ring traffic (all-reduce + all-gather of G) and time per step for each GPU count and link."""
    rows = []
    for gpus in GPU_COUNTS:
        sent = 3 * (gpus - 1) / gpus * gradient_bytes
        for link, gbps in LINKS_GBPS.items():
            seconds = sent / (gbps * 1e9 / 8)
            rows.append({"gpus": gpus, "link": link, "sent_mb": sent / 1e6, "ms": seconds * 1e3,
                         "share_of_step": seconds / (STEP_S_SDXL_H200 + seconds)})
    return rows


def main() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model, shards = tiny_assets(root)
        out = root / "comm.json"
        mp.spawn(_rank, args=(root, model, shards, free_port(), out), nprocs=WORLD, join=True)
        measured = json.loads(out.read_text())
    by_op = measured["bytes_per_step_by_op"]
    gradients = measured["lora_params"] * 4  # fp32 LoRA gradients, G
    sdxl_params = sum(p.numel() for p in SdxlSizedLora().parameters())  # r16 on every SDXL attention projection
    sdxl_bytes = sdxl_params * 4
    result = {"world_size": WORLD, **measured, "lora_grad_bytes": gradients,
              "all_reduce_over_g": by_op.get("all_reduce", 0) / gradients,
              "all_gather_over_g": WORLD * by_op.get("all_gather_into_tensor", 0) / gradients,
              "stats_all_reduce_bytes": 16, "sdxl_lora_params": sdxl_params, "sdxl_lora_fp32_bytes": sdxl_bytes,
              "paper": paper_calculation(sdxl_bytes)}
    ops = ", ".join(f"{name} {size / 1e6:.3f} MB" for name, size in by_op.items())
    print(f"communication (tiny SD1.5, LoRA {measured['lora_params']:,} params = G {gradients / 1e6:.3f} MB fp32, "
          f"ZeRO-1, 2 ranks), messages per rank per step: {ops}, plus 16 B of step statistics; "
          f"all-reduce {result['all_reduce_over_g']:.2f} G, all-gather {result['all_gather_over_g']:.2f} G in all")
    for row in result["paper"]:
        print(f"  SDXL LoRA G = {sdxl_bytes / 1e6:.1f} MB, {row['gpus']:>2} GPUs, {row['link']}: "
              f"{row['sent_mb']:.1f} MB sent per GPU, {row['ms']:.1f} ms = {row['share_of_step']:.1%} of a step")
    write_result("communication", result)
    return result


if __name__ == "__main__":
    main()
