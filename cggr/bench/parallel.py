"""``cggr bench`` on several processes: ``torchrun --nproc-per-node N -m cggr bench ...``.

The protocol is the single-process one with the batch split across ranks: every step draws the same global
batch of ``--batch-size`` rows (same order, same seed), rank r trains rows ``[r * B / N, (r + 1) * B / N)``
of it, and the gradients are averaged over the ranks after the backward (one all-reduce of the flattened
gradients: DDP's arithmetic, without DDP's overlap of communication with the backward), so every rank
holds the same weights after every step. A selective configuration keeps ``ceil(r * B / N)`` rows per rank
(``cggr.DataParallel``: per-rank selection by default, ``--data-parallel global`` for selection over the
global batch). Budgets count the global batch's tokens; time is the wall time of the (synchronised) step.
Rank 0 logs and writes the reports; stage-1 checkpoints and reference models are trained once (the first
rank to take ``--cache-dir``'s lock) and loaded by the others.
"""
import dataclasses
import os
from typing import Optional

import torch
import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class ProcessGroupInfo:
    rank: int
    world_size: int
    local_rank: int
    host_group: Optional[object] = None  # gloo group for host-side decisions (None: the default group)


def init_from_env(device: str) -> Optional[ProcessGroupInfo]:
    """The process group of a ``torchrun`` launch (WORLD_SIZE > 1 in the environment), initialised here
    (NCCL on CUDA, gloo on the CPU); None for a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if device.startswith("cuda"):
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    # Host decisions (stop, evaluate, the learning rate's clock) go over gloo: NCCL would move them through
    # the GPU, a synchronisation inside --clock span's open spans
    host_group = dist.new_group(backend="gloo") if dist.get_backend() == "nccl" else None
    return ProcessGroupInfo(dist.get_rank(), dist.get_world_size(), local_rank, host_group)


def local_device(device: str, info: Optional[ProcessGroupInfo]) -> str:
    """``cuda`` becomes this rank's GPU (``cuda:LOCAL_RANK``)."""
    if info is not None and device == "cuda":
        return f"cuda:{info.local_rank}"
    return device


def local_slice(idx, info: Optional[ProcessGroupInfo]):
    """This rank's contiguous share of a global batch's row indices."""
    if info is None:
        return idx
    per_rank = len(idx) // info.world_size
    return idx[info.rank * per_rank:(info.rank + 1) * per_rank]


def average_gradients(parameters, info: Optional[ProcessGroupInfo]):
    """Every rank's gradients replaced by their mean over the ranks (one all-reduce). A parameter without a
    gradient on this rank takes part with zeros, so that every rank issues the same collective; one without
    a gradient on every rank keeps none (the optimizer skips it, as it would in one process)."""
    if info is None:
        return
    params = [p for p in parameters if p.requires_grad]
    had_grad = [p.grad is not None for p in params]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flags = torch.tensor(had_grad, dtype=grads[0].dtype, device=grads[0].device)
    flat = torch.cat([g.reshape(-1) for g in grads] + [flags])
    dist.all_reduce(flat)
    flat /= info.world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
    if not all(had_grad):  # (a host read only then: the usual step, every gradient present, has none)
        for p, mine, any_rank in zip(params, had_grad, flat[offset:].tolist()):
            if not mine and any_rank == 0:
                p.grad = None


def agree(value, info: Optional[ProcessGroupInfo]):
    """Rank 0's value on every rank, for host decisions that must not diverge (--max-wall's, the time
    budget's clock): one broadcast on the host."""
    if info is None:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=info.host_group)
    return box[0]


def mean_over_ranks(value: torch.Tensor, info: Optional[ProcessGroupInfo]) -> torch.Tensor:
    """The mean of ``value`` over the ranks (one all-reduce on its device)."""
    if info is None:
        return value
    total = value.clone()
    dist.all_reduce(total)
    return total / info.world_size


def barrier(info: Optional[ProcessGroupInfo]):
    if info is not None:
        dist.barrier()
