# Gathering teacher targets and sample masks across data-parallel ranks (no autograd).
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class GatheredTargets:
    """Targets and masks of the global batch, in rank order.

    targets: (B_global, D) or None when only the masks were gathered.
    mask: (B_global,) float, 1 for a real image, 0 for a masked (text-only) sample.
    offset: global index of this rank's first sample (its contrastive labels start here).
    world_size: number of ranks that took part (1 without a process group).
    """

    targets: torch.Tensor | None
    mask: torch.Tensor
    offset: int
    world_size: int


def _world(process_group) -> int:
    if process_group is None:
        return 1
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            "process_group was given but torch.distributed is not initialized; "
            "call torch.distributed.init_process_group first or pass process_group=None"
        )
    return dist.get_world_size(process_group)


@torch.no_grad()
def gather_targets(
    targets: torch.Tensor | None, mask: torch.Tensor, process_group=None
) -> GatheredTargets:
    """All-gather ``targets`` (B, D) and ``mask`` (B,) once, without autograd.

    Teachers are frozen, so targets carry no gradient and are gathered in their own dtype (bf16
    targets move half the bytes of fp32). Ranks may hold different batch sizes: the sizes are
    gathered first (one tiny collective and one host sync), shorter batches are padded to the
    longest, and the padding rows are dropped after the gather.
    """
    world = _world(process_group)
    if world == 1:
        return GatheredTargets(targets, mask, 0, 1)
    rank = dist.get_rank(process_group)
    local = mask.shape[0]
    size = torch.tensor([local], device=mask.device, dtype=torch.int64)
    sizes_t = torch.empty(world, device=mask.device, dtype=torch.int64)
    dist.all_gather_into_tensor(sizes_t, size, group=process_group)
    sizes = sizes_t.tolist()
    longest = max(sizes)
    offset = sum(sizes[:rank])

    def gather_rows(x: torch.Tensor) -> torch.Tensor:
        if local < longest:
            pad = x.new_zeros((longest - local,) + tuple(x.shape[1:]))
            x = torch.cat([x, pad])
        out = x.new_empty((world * longest,) + tuple(x.shape[1:]))
        dist.all_gather_into_tensor(out, x.contiguous(), group=process_group)
        if all(s == longest for s in sizes):
            return out
        keep = torch.cat([
            torch.arange(r * longest, r * longest + s, device=x.device)
            for r, s in enumerate(sizes)
        ])
        return out.index_select(0, keep)

    gathered_mask = gather_rows(mask)
    gathered_targets = gather_rows(targets) if targets is not None else None
    return GatheredTargets(gathered_targets, gathered_mask, offset, world)
