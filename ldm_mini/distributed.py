"""Several processes started by torchrun: where this process stands, its device, and the few collectives the
command line (many images) and train.py (DistributedDataParallel) need.

torchrun (python -m torch.distributed.run) starts the processes and tells each its place in RANK (0 ..
WORLD_SIZE - 1 over all nodes), WORLD_SIZE and LOCAL_RANK (its number on its node: its GPU). A plain `python`
run has none of them: rank 0 of 1, no process group, and every function here is then a no-op or the identity.
"""

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor


def launched() -> bool:
    """Started by torchrun (it sets both variables, even for one process)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def rank_and_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    """Rank 0: the one process that writes shared files and prints."""
    return rank_and_world()[0] == 0


def device_for_rank(device: torch.device) -> torch.device:
    """cuda -> cuda:LOCAL_RANK under torchrun, one GPU per process; other devices as they are. A ValueError
    when this node has fewer GPUs than processes."""
    if device.type != "cuda" or not launched():
        return device
    local, count = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
    if local >= count:
        raise ValueError(f"LOCAL_RANK {local}, but this node has {count} GPU(s): start at most that many "
                         "processes per node (torchrun --nproc_per_node)")  # fmt: skip
    return torch.device("cuda", local)


def init(device: torch.device) -> None:
    """Join torchrun's process group (its rendezvous address is in MASTER_ADDR and MASTER_PORT): NCCL between
    GPUs, gloo between CPU processes. Nothing without torchrun."""
    if launched() and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL's collectives run on the current device
        # a process with nothing left to do waits at the next collective for the others' work: allow an hour
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=1))


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def gather(obj) -> list | None:
    """Every rank's obj in rank order on rank 0, None on the others; [obj] without a process group."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast(x: Tensor, src: int = 0) -> Tensor:
    """x replaced in place by rank src's (itself without a process group)."""
    if dist.is_initialized():
        dist.broadcast(x, src=src)
    return x


def sum_over_ranks(x: Tensor) -> Tensor:
    """x summed over the ranks, in place (itself without a process group)."""
    if dist.is_initialized():
        dist.all_reduce(x)  # SUM
    return x


def mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """The ranks' mean of each number (e.g. each rank's mean loss over an equal slice of the batch)."""
    if not dist.is_initialized():
        return values
    total = sum_over_ranks(torch.tensor(list(values.values()), dtype=torch.float64, device=device))
    return dict(zip(values, (total / dist.get_world_size()).tolist(), strict=True))
