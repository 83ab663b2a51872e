"""Data-parallel training inside `gacd`, with `torch.distributed` alone.

Something else starts the processes and their process group (`study/` does it with Ray
Train's `TorchTrainer`; `torchrun` would do as well); `fit` sees the group and trains
data-parallel over it. Without a group (or in a group of one) nothing here changes a run.

The rule, for every number of workers `W`:
- `data.batch_size` is the **global** batch: every worker draws the same global batch (the
  same seeded order and crops as a single process would), keeps its `batch_size / W` rows,
  and DistributedDataParallel averages the gradients, so one step is the single-process step
  on the same images. The learning rate is therefore not rescaled with `W`.
- Batch-norm layers normalise with each worker's own rows (plain BatchNorm, as DDP does by
  default; no SyncBatchNorm), and their running statistics are rank 0's: made equal on every
  worker after each epoch, so every worker evaluates, and rank 0 checkpoints, one model.
- Losses across samples see the global batch: in-batch negatives and memory-bank contrasts
  gather every worker's embeddings (`gather`), so the negatives, the bank's updates and its
  normaliser are those of the single-process step.
- Evaluation is sharded: worker `r` attacks the `r`-th contiguous `1/W` of the images, the
  counts are summed over workers; the random starts of worker `r` come from `seed + r`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from gacd.config import ConfigError
from gacd.data import Batch


@dataclass(frozen=True)
class Group:
    """This process's place among the workers of a data-parallel run."""

    rank: int = 0
    size: int = 1

    @property
    def parallel(self) -> bool:
        return self.size > 1


def current() -> Group:
    """The initialised `torch.distributed` process group, or a group of one."""
    if dist.is_available() and dist.is_initialized():
        return Group(dist.get_rank(), dist.get_world_size())
    return Group()


def worker_batch_size(batch_size: int, group: Group) -> int:
    """Each worker's rows of a global batch of `batch_size`."""
    if batch_size % group.size:
        raise ConfigError(
            "data.batch_size",
            f"a multiple of the {group.size} data-parallel workers (it is the global batch)",
            batch_size,
        )
    return batch_size // group.size


def shard(batch: Batch, group: Group) -> Batch:
    """This worker's contiguous rows of a global batch."""
    if not group.parallel:
        return batch
    rows = worker_batch_size(len(batch.y), group)
    part = slice(group.rank * rows, (group.rank + 1) * rows)
    return Batch(batch.x[part], batch.y[part], batch.index[part])


def rows(count: int, group: Group) -> slice:
    """This worker's contiguous share of `count` rows (evaluation: balanced to one row)."""
    return slice(group.rank * count // group.size, (group.rank + 1) * count // group.size)


def data_parallel(module: nn.Module, device: torch.device, group: Group) -> nn.Module:
    """`module` wrapped for gradient averaging over the group (itself in a group of one).
    Buffers are rank 0's once, when wrapped, and not at every forward (`same_buffers` makes
    them so again once per epoch)."""
    if not group.parallel:
        return module
    device_ids = None  # CPU: DDP takes none
    if device.type == "cuda":
        device_ids = [device.index if device.index is not None else torch.cuda.current_device()]
    return nn.parallel.DistributedDataParallel(
        module, device_ids=device_ids, forward_sync_buffers=False
    )


def same_buffers(module: nn.Module, group: Group) -> None:
    """Rank 0's buffers (batch-norm statistics, memory banks) on every worker."""
    if group.parallel:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def total(values: torch.Tensor, group: Group) -> torch.Tensor:
    """The sum of `values` over the workers (every worker gets it)."""
    if group.parallel:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def gather(values: torch.Tensor, group: Group) -> torch.Tensor:
    """Every worker's `values` (its rows of the global batch) concatenated in rank order: the
    global batch's rows. Gradients flow back to each worker's own rows (summed over the
    workers' losses), so a loss of the global batch's rows computed on every worker, of which
    each keeps its `own_rows`, trains as the single-process loss does once DDP averages."""
    if not group.parallel:
        return values
    if values.is_floating_point():
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(values), 0)
    parts = [torch.empty_like(values) for _ in range(group.size)]
    dist.all_gather(parts, values)
    return torch.cat(parts, 0)


def own_rows(values: torch.Tensor, group: Group) -> torch.Tensor:
    """This worker's rows of a global batch's `values` (`gather`'s order)."""
    if not group.parallel:
        return values
    rows = len(values) // group.size
    return values[group.rank * rows : (group.rank + 1) * rows]


def all_true(flags: torch.Tensor, group: Group) -> torch.Tensor:
    """Elementwise: whether every worker's flag is true (so that all stop together)."""
    return total((~flags.bool()).float(), group) == 0
