"""Multi-process training on PyTorch's own engine (torchrun + DistributedDataParallel).

Launch with `torchrun --nproc-per-node 8 -m cli.main distill ...` (or `spofa distill
--nproc 8`, which re-launches itself through torchrun's elastic launcher). The process
group comes from torchrun's environment: NCCL on GPUs, gloo on CPU, one device per rank.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (WORLD_SIZE > 1); a no-op otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if rank != 0:
        from spofa_deploy.console import console

        console.quiet = True  # rank 0 alone prints progress and messages
    return DistInfo(rank, world, local)


def info() -> DistInfo:
    """This process's rank and world size (rank 0 of 1 outside torchrun)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of `t` over ranks (returns a new tensor; identity on one process).

    This is MEMA's `sync` hook: with equal per-rank batches, the mean of per-rank means
    is the global batch mean, so every rank updates the same baselines.
    """
    if not info().enabled:
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / dist.get_world_size()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if info().enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if info().enabled:
        dist.barrier()


def relaunch_with_torchrun(nproc: int, argv: list[str]) -> int:
    """Re-run this CLI invocation under torchrun's elastic launcher with `nproc` processes."""
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(["--nproc-per-node", str(nproc), "--standalone", "-m", "cli.main", *argv])
    run(args)
    return 0


def broadcast_object(obj):
    """Rank 0's value of `obj` on every rank (e.g. a run folder name with a timestamp)."""
    if not info().enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
