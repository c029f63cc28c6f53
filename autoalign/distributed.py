"""Collectives under ``torch.distributed``: every pass that accumulates on a
process's shard of the calibration data reduces here, so every process ends with
the statistics of all shards (and solves the same plan).

Each function is a no-op unless ``torch.distributed`` is initialised. Tensors
are reduced in a fixed (sorted) order, so every process issues the same
collectives in the same order.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

__all__ = ["is_distributed", "rank_and_world", "all_reduce_sum", "all_reduce_count", "all_reduce_moments", "sync_batchnorm_stats"]


def is_distributed() -> bool:
    """Whether ``torch.distributed`` is available and initialised."""
    import torch.distributed as dist

    return bool(dist.is_available() and dist.is_initialized())


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)`` of this process; ``(0, 1)`` when not distributed.

    Examples
    --------
    >>> rank_and_world()
    (0, 1)
    """
    if not is_distributed():
        return 0, 1
    import torch.distributed as dist

    return int(dist.get_rank()), int(dist.get_world_size())


def collective_device() -> torch.device:
    """Where scalars for a collective live: the current CUDA device under NCCL, else the CPU."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensors: Sequence[torch.Tensor]) -> None:
    """Sum each tensor over processes, in place and in the given order (no-op when not distributed)."""
    if not is_distributed():
        return
    import torch.distributed as dist

    for t in tensors:
        dist.all_reduce(t)


def all_reduce_count(value: int) -> int:
    """``value`` summed over processes (itself when not distributed).

    Examples
    --------
    >>> all_reduce_count(3)
    3
    """
    if not is_distributed():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=collective_device())
    all_reduce_sum([t])
    return int(t.item())


def all_reduce_moments(acc: dict[str, list[Any]]) -> None:
    """Sum per-channel moments ``{name: [count, Σ y, Σ y²]}`` over processes, in place.

    A no-op unless ``torch.distributed`` is initialised. Every process must hold
    the same names (every process feeds at least one batch). Used to make
    statistics that repair code accumulates on each process's shard global.

    Examples
    --------
    >>> import torch
    >>> acc = {"bn": [4, torch.ones(3), torch.ones(3)]}
    >>> all_reduce_moments(acc)  # not distributed: unchanged
    >>> acc["bn"][0]
    4
    """
    if not is_distributed():
        return
    import torch.distributed as dist

    for name in sorted(acc):
        cnt, s, q = acc[name]
        s = torch.as_tensor(s, dtype=torch.float64).clone()
        q = torch.as_tensor(q, dtype=torch.float64).clone()
        c = torch.tensor([float(cnt)], dtype=torch.float64, device=s.device)
        for t in (c, s, q):
            dist.all_reduce(t)
        acc[name] = [int(c.item()), s, q]


def sync_batchnorm_stats(model: nn.Module) -> nn.Module:
    """Make BatchNorm running statistics estimated by :func:`autoalign.reset_bn`
    on each process's shard equal to those of one pass over all shards.

    ``reset_bn`` (``momentum=None``) leaves every BatchNorm with the average of
    its per-batch means and variances over the ``k`` batches it saw
    (``num_batches_tracked``). Averaging over processes weighted by ``k`` gives
    exactly the single-process average over all batches. A no-op unless
    ``torch.distributed`` is initialised; returns ``model``.

    Examples
    --------
    >>> import torch
    >>> net = torch.nn.BatchNorm1d(3)
    >>> sync_batchnorm_stats(net) is net  # not distributed: unchanged
    True
    """
    if not is_distributed():
        return model
    import torch.distributed as dist

    for _, bn in sorted(model.named_modules(), key=lambda kv: kv[0]):
        if not (isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.track_running_stats and bn.running_mean is not None):
            continue
        k = float(bn.num_batches_tracked) if bn.num_batches_tracked is not None else 1.0
        mean = bn.running_mean.detach().to(torch.float64) * k
        var = bn.running_var.detach().to(torch.float64) * k
        kt = torch.tensor([k], dtype=torch.float64, device=mean.device)
        for t in (kt, mean, var):
            dist.all_reduce(t)
        total = float(kt.item())
        if total <= 0:
            continue
        with torch.no_grad():
            bn.running_mean.copy_((mean / total).to(bn.running_mean.dtype))
            bn.running_var.copy_((var / total).to(bn.running_var.dtype))
            if bn.num_batches_tracked is not None:
                bn.num_batches_tracked.fill_(int(round(total)))
    return model
