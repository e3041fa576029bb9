"""Row selection under data parallelism (DDP, FSDP2): what every rank trains and how the loss is normalised.

``DataParallel`` is the setting (``CGGRModel(data_parallel=...)``, ``CGGRLoss(data_parallel=...)``); the
functions below are the collectives it runs. Contracts:

- **Same work on every rank.** Every rank trains ``k = ceil(ratio * B)`` rows of its ``B``: per-rank
  selection chooses them among its own rows; global selection (``selection='global'``) all-gathers the
  [B] row values (O(B) floats), lets the policy choose ``W * k`` rows of the concatenated batch (rank-major;
  one process would choose ``ceil(ratio * W * B)``, the same number when ``ratio * B`` is whole; the
  choice is read on the host, one synchronisation per step),
  and hands each rank ``k`` of them (its own chosen rows first, the surplus of other ranks in order), whose
  tokens it receives through one all-gather of the batch's row tensors (O(W * B * T) token ids).
- **Loss normalisation.** The loss of each rank is ``sum of the trained targets' NLL * W / N``, ``N`` the
  trained targets all-reduced over the group: DDP's (or FSDP2's) gradient mean then gives the gradient of
  the mean over every trained target of every rank, i.e. single-process training on the concatenated batch
  with the same rows. A rank whose rows have no valid target contributes 0 and runs the same collectives.
- **Checks.** The first step all-gathers the configuration (policy, curriculum and its step, seed,
  selection, world size, step options) and raises a ``ValueError`` naming the setting that differs,
  instead of a hang or a silent divergence later. Batch rows are compared every step (global selection:
  on the host before any exchange; per-rank: read back at the next training step or evaluation, so that
  the current step does not synchronise). A rank leaves a step early only on decisions every rank shares
  (the ratio, not its own batch size), so a rank with fewer rows still runs every collective.
- Every collective runs on ``group`` (default: the default process group) under that group's timeout.
"""
import dataclasses
import re
from contextlib import contextmanager
from typing import Optional, Sequence

import torch
import torch.distributed as dist

DATA_PARALLEL_AUTO = "auto"
SELECTIONS = ("per_rank", "global")


@dataclasses.dataclass(frozen=True)
class DataParallel:
    """Data-parallel row selection.

    Args:
        selection: ``'per_rank'`` (default: each rank chooses among its own rows; no exchange of rows) or
            ``'global'`` (the policy chooses over the whole data-parallel batch, as one process would).
        group: the data-parallel process group (None: the default group).
        check_config: all-gather the configuration at the first step and compare it across ranks.
    """
    selection: str = "per_rank"
    group: Optional[object] = None
    check_config: bool = True

    def __post_init__(self):
        if self.selection not in SELECTIONS:
            raise ValueError(f"DataParallel.selection must be one of {SELECTIONS}, got {self.selection!r}")
        if not isinstance(self.check_config, bool):
            raise TypeError(f"DataParallel.check_config must be a bool, got {type(self.check_config).__name__}")

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def resolve_data_parallel(value, owner: str) -> Optional[DataParallel]:
    """``'auto'``: ``DataParallel()`` when torch.distributed is initialised with more than one process, else
    None. None: no collectives (each process on its own). A ``DataParallel`` needs an initialised group."""
    if isinstance(value, str) and value == DATA_PARALLEL_AUTO:
        return DataParallel() if is_initialized() and dist.get_world_size() > 1 else None
    if value is None:
        return None
    if not isinstance(value, DataParallel):
        raise TypeError(f"{owner}: data_parallel must be 'auto', None or a cggr.DataParallel, "
                        f"got {type(value).__name__}")
    if not is_initialized():
        raise ValueError(f"{owner}: data_parallel={value!r} needs an initialised torch.distributed process group "
                         "(torchrun / accelerate launch, then torch.distributed.init_process_group) before the "
                         "first training step; without one, pass data_parallel=None")
    return value


# -- checks -----------------------------------------------------------------------------------------------
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def config_fingerprint(config: dict) -> dict:
    """name -> the value's repr without memory addresses (a callable in ``compile_options``, say, has a
    different address in every process: the same object type then compares equal)."""
    return {name: _ADDRESS.sub("", repr(value)) for name, value in config.items()}


def check_same_config(config: dict, setting: DataParallel, owner: str):
    """All-gather ``config`` (name -> a value with a stable repr) and raise naming every entry that differs."""
    gathered = [None] * setting.world_size
    dist.all_gather_object(gathered, config_fingerprint(config), group=setting.group)
    differing = [name for name in config if len({ranks[name] for ranks in gathered}) > 1]
    if differing:
        lines = "; ".join(f"{name}: " + ", ".join(f"rank {r} {ranks[name]}" for r, ranks in enumerate(gathered))
                          for name in differing)
        raise ValueError(f"{owner}: the data-parallel ranks are configured differently ({lines}). Every rank "
                         "must build the same selection (same policy, ratio, curriculum, seed, batch rows)")


def _rows_error(owner: str, rows: Sequence[int]) -> ValueError:
    return ValueError(f"{owner}: the data-parallel ranks got different batch rows ({', '.join(f'rank {r}: {b}' for r, b in enumerate(rows))}); "
                      "every rank must train the same number of rows: give each rank batches of the same size "
                      "(torch.utils.data.DistributedSampler, drop_last=True)")


class DeferredRowCheck:
    """The per-rank path's row-count check without a synchronisation: the all-gathered counts of step n are
    copied to the host asynchronously and read at step n + 1 (or by ``flush``)."""

    def __init__(self, owner: str):
        self.owner = owner
        self._pending = None

    def push(self, gathered_rows: torch.Tensor):
        if gathered_rows.device.type == "cuda":
            host = torch.empty(gathered_rows.shape, dtype=gathered_rows.dtype, pin_memory=True)
            host.copy_(gathered_rows, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending = (host, event)
        else:
            self._pending = (gathered_rows, None)

    def flush(self):
        if self._pending is None:
            return
        host, event = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()
        rows = host.tolist()
        if len(set(rows)) > 1:
            raise _rows_error(self.owner, rows)


# -- collectives of a step ----------------------------------------------------------------------------------
def gather_counts(count: torch.Tensor, rows: int, setting: DataParallel) -> torch.Tensor:
    """One all-gather of (this rank's trained-target count, its batch rows): [W, 2] int64 on count's device."""
    mine = torch.stack([count.to(torch.int64).reshape(()),
                        torch.tensor(rows, dtype=torch.int64, device=count.device)])
    out = [torch.empty_like(mine) for _ in range(setting.world_size)]
    dist.all_gather(out, mine, group=setting.group)
    return torch.stack(out)


def gather_sizes(batch_rows: int, seq_len: int, device, setting: DataParallel, owner: str) -> None:
    """Global selection: every rank must hold a [B, T] batch of the same shape (checked on the host)."""
    mine = torch.tensor([batch_rows, seq_len], dtype=torch.int64, device=device)
    out = [torch.empty_like(mine) for _ in range(setting.world_size)]
    dist.all_gather(out, mine, group=setting.group)
    sizes = [tuple(t.tolist()) for t in out]
    if len({b for b, _ in sizes}) > 1:
        raise _rows_error(owner, [b for b, _ in sizes])
    if len({t for _, t in sizes}) > 1:
        raise ValueError(f"{owner}: DataParallel(selection='global') exchanges rows between ranks and needs the "
                         f"same sequence length on every rank, got {', '.join(f'rank {r}: {t}' for r, (_, t) in enumerate(sizes))}; "
                         "pad every batch to one length (padding='max_length') or use selection='per_rank'")


def all_gather_rows(tensor: torch.Tensor, setting: DataParallel) -> torch.Tensor:
    """[B, ...] on every rank -> [W * B, ...], rank-major (same shape on every rank)."""
    tensor = tensor.contiguous()
    out = [torch.empty_like(tensor) for _ in range(setting.world_size)]
    dist.all_gather(out, tensor, group=setting.group)
    return torch.cat(out)


def assign_rows(chosen: Sequence[int], world_size: int, batch_rows: int, rank: int) -> list:
    """This rank's share of the globally ``chosen`` rows (positions in the rank-major concatenation), ``k =
    len(chosen) / W`` each: every rank keeps its own chosen rows first (up to k; no transfer), the surplus
    of the ranks with more than k goes, in global order, to the ranks with fewer, in rank order."""
    k = len(chosen) // world_size
    own = [[] for _ in range(world_size)]
    for position in sorted(chosen):
        own[position // batch_rows].append(position)
    surplus = [p for rows in own for p in rows[k:]]
    share = []
    for r in range(world_size):
        mine = own[r][:k]
        need = k - len(mine)
        mine = mine + surplus[:need]
        surplus = surplus[need:]
        if r == rank:
            share = sorted(mine)
    return share


def sum_over_ranks(count: torch.Tensor, setting: DataParallel) -> torch.Tensor:
    total = count.to(torch.int64).clone()
    dist.all_reduce(total, group=setting.group)
    return total


def global_token_mean(loss_sum: torch.Tensor, count: torch.Tensor, setting: DataParallel) -> torch.Tensor:
    """``loss_sum * W / N``, ``N = count`` summed over the group (at least 1): under DDP/FSDP2's gradient
    mean, the gradient of the mean over every rank's trained targets."""
    total = sum_over_ranks(count, setting)
    return loss_sum * setting.world_size / total.clamp_min(1).to(loss_sum.dtype)


def mean_over_ranks(value: torch.Tensor, setting: DataParallel) -> torch.Tensor:
    out = value.to(torch.float32).clone()
    dist.all_reduce(out, group=setting.group)
    return out / setting.world_size


# -- FSDP2 -------------------------------------------------------------------------------------------------
def _fsdp_module_class():
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return None
    return FSDPModule


def is_fsdp_module(module) -> bool:
    cls = _fsdp_module_class()
    return cls is not None and isinstance(module, cls)


def fsdp_original_class(module) -> type:
    """``type(module)``, or for an FSDP2 module (``fully_shard`` swaps in a class ``FSDP<Name>``) the class
    it had before."""
    cls = _fsdp_module_class()
    if cls is None or not isinstance(module, cls):
        return type(module)
    return next(c for c in type(module).__mro__ if not issubclass(c, cls))


@contextmanager
def unsharded(module):
    """The parameters of an FSDP2 module's own group gathered for code that uses them outside its forward
    (the router's embedding, final norm and LM head); a no-op for any other module. Every rank must enter
    it (an all-gather)."""
    if not is_fsdp_module(module):
        yield
        return
    # FSDP2 initialises its root at the root's first forward; a router pass may come before it (cggr.hf
    # chooses the rows ahead of the forward), and the blocks it runs must not take themselves for roots
    state = module._get_fsdp_state()
    state._lazy_init()
    module.unshard()
    try:
        yield
    finally:
        module.reshard()
