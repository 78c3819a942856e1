"""Test double of `npu_device.distribute`: records calls; a single process stands for each rank."""
import os

import npu_device


def _workers() -> tuple[int, int]:
    return int(os.environ.get("RANK_SIZE", "1")), int(os.environ.get("RANK_ID", "0"))


def shard_and_rebatch_dataset(dataset, global_bs):
    """Keep this rank's share of the dataset; returns it and the per-rank batch size."""
    npu_device.record("shard_and_rebatch_dataset", global_bs=global_bs)
    workers, worker_id = _workers()
    if workers <= 1:
        return dataset, global_bs
    if global_bs % workers != 0:
        raise ValueError(f"Batch size must be divisible by num npus: {workers}")
    return dataset.shard(workers, worker_id), global_bs // workers


def npu_distributed_keras_optimizer_wrapper(
    optimizer, reduce_reduction="mean", fusion=1, fusion_id=-1, group="hccl_world_group"
):
    """Real: all-reduces gradients before applying. One process here, so the mean is the identity."""
    npu_device.record(
        "npu_distributed_keras_optimizer_wrapper",
        optimizer=type(optimizer).__name__,
        reduce_reduction=reduce_reduction,
    )
    return optimizer


def broadcast(values, root_rank=0, fusion=2, fusion_id=0, group="hccl_world_group"):
    """Real: copies root_rank's values to every rank. Records how many values were sent."""
    count = len(values) if isinstance(values, (list, tuple)) else 1
    npu_device.record("broadcast", count=count, root_rank=root_rank)
