"""The project's only collectives: gather that keeps the local gradient, sum and min all-reduces."""
from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along dim 0; gradients flow back to every rank's slice
    (torch.distributed.nn.all_gather's backward reduce-scatters them). Identity on one process."""
    rank, ws = world()
    if ws == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks without gradient (for Sinkhorn statistics)."""
    _, ws = world()
    if ws > 1:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_reduce_min(x: int) -> int:
    """The smallest of a host integer over ranks (no gradient): equal batch sizes for the gathers.
    A CPU tensor, so with the ``cpu:gloo,cuda:nccl`` group (``trainer.pretrain``) it goes through gloo
    and never waits on the GPU's queue."""
    _, ws = world()
    if ws == 1:
        return int(x)
    t = torch.tensor([int(x)])
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def ranks_agree(*xs: int) -> bool:
    """True when every rank passed the same integers: one MIN all-reduce of (x, -x)."""
    _, ws = world()
    if ws == 1:
        return True
    t = torch.tensor([int(x) for x in xs] + [-int(x) for x in xs])
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    n = len(xs)
    return bool(torch.equal(t[:n], -t[n:]))
