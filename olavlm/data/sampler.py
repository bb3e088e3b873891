# Epoch plans: shuffled or modality-length-grouped global batches, split across ranks.
"""The order in which an epoch visits the dataset, as a list of global batches.

A global batch holds ``world_size * batch_size`` dataset indices; rank ``r`` takes the ``r``-th
contiguous slice. The order is a pure function of ``(seed, epoch)`` (and, with length
grouping, of ``batch_size * world_size``), so a resumed run rebuilds it from the checkpointed
state and continues at the saved position: no sample repeated, none skipped.

``group_by_modality_length`` follows LLaVA's ``get_modality_length_grouped_indices``: image and
text-only samples go to separate megabatches of ``world_size * batch_size``, each sorted by
length and split so that every rank gets a similar number of tokens; the megabatches are
shuffled and the two leftovers form one last, mixed megabatch. Unlike LLaVA, every random draw
uses the epoch's generator (LLaVA draws the inner permutations from the global RNG, which a
resumed run cannot reproduce).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "EpochPlan",
    "length_grouped_indices",
    "modality_length_grouped_indices",
    "plan_epoch",
    "split_to_even_chunks",
]


def split_to_even_chunks(indices: Sequence[int], lengths: Sequence[int], num_chunks: int):
    """``num_chunks`` lists of equal size with similar total length (LLaVA's greedy split);
    round-robin when ``len(indices)`` does not divide evenly."""
    if len(indices) % num_chunks != 0:
        return [list(indices[i::num_chunks]) for i in range(num_chunks)]
    per_chunk = len(indices) // num_chunks
    chunks: list[list[int]] = [[] for _ in range(num_chunks)]
    totals = [0.0] * num_chunks
    for index in indices:
        shortest = totals.index(min(totals))
        chunks[shortest].append(index)
        totals[shortest] += lengths[index]
        if len(chunks[shortest]) == per_chunk:
            totals[shortest] = float("inf")
    return chunks


def length_grouped_indices(lengths: Sequence[int], batch_size: int, world_size: int,
                           generator: torch.Generator) -> list[int]:
    """Random megabatches of ``world_size * batch_size``, each sorted longest first and split
    evenly across ranks (LLaVA's ``get_length_grouped_indices``)."""
    indices = torch.randperm(len(lengths), generator=generator).tolist()
    size = world_size * batch_size
    out: list[int] = []
    for start in range(0, len(indices), size):
        megabatch = sorted(indices[start:start + size], key=lambda i: lengths[i], reverse=True)
        for chunk in split_to_even_chunks(megabatch, lengths, world_size):
            out += chunk
    return out


def modality_length_grouped_indices(lengths: Sequence[int], batch_size: int, world_size: int,
                                    generator: torch.Generator) -> list[int]:
    """LLaVA's modality-aware grouping; ``lengths`` are signed (negative = text-only)."""
    lengths = [int(x) for x in lengths]
    if any(x == 0 for x in lengths):
        raise ValueError("modality lengths must be non-zero (the sign tells the modality)")
    if all(x > 0 for x in lengths) or all(x < 0 for x in lengths):
        return length_grouped_indices([abs(x) for x in lengths], batch_size, world_size,
                                      generator)
    mm = [i for i, x in enumerate(lengths) if x > 0]
    lang = [i for i, x in enumerate(lengths) if x < 0]
    size = world_size * batch_size
    megabatches, leftovers = [], []
    for group in (mm, lang):
        group_lengths = [abs(lengths[i]) for i in group]
        order = length_grouped_indices(group_lengths, batch_size, world_size, generator)
        shuffled = [group[i] for i in order]
        parts = [shuffled[i:i + size] for i in range(0, len(shuffled), size)]
        megabatches += parts[:-1]
        leftovers += parts[-1]
    perm = torch.randperm(len(megabatches), generator=generator).tolist()
    out = [i for p in perm for i in megabatches[p]]
    return out + sorted(leftovers)


@dataclasses.dataclass
class EpochPlan:
    """The global batches still to visit in an epoch (from ``start``), and how many samples
    its end leaves out (``drop_last``, or fewer samples than ranks)."""

    epoch: int
    start: int
    global_batches: list[list[int]]
    num_dropped: int

    def rank_batches(self, rank: int, world_size: int) -> list[list[int]]:
        return [_rank_slice(gb, rank, world_size) for gb in self.global_batches]


def _rank_slice(global_batch: list[int], rank: int, world_size: int) -> list[int]:
    # Contiguous slices whose sizes differ by at most one (a short last batch).
    n = len(global_batch)
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return global_batch[start:start + base + (rank < extra)]


def plan_epoch(
    num_samples: int,
    *,
    epoch: int,
    start: int = 0,
    batch_size: int,
    world_size: int = 1,
    shuffle: bool = True,
    seed: int = 0,
    modality_lengths: np.ndarray | Sequence[int] | None = None,
    drop_last: bool = False,
    grad_accum: int = 1,
) -> EpochPlan:
    """The plan of ``epoch`` from global position ``start`` (module docstring).

    ``grad_accum``: micro-batches per optimizer step. LLaVA's modality-length grouping sorts
    within megabatches of world_size x batch_size x grad_accum samples (what one optimizer
    step consumes); without grouping it changes nothing.

    Without ``drop_last`` the last global batch may be short (every rank still gets at least
    one sample); samples that cannot give every rank one are left out and counted in
    ``num_dropped``. With ``modality_lengths`` the order is LLaVA's modality-length grouping.
    """
    if not 0 <= start <= num_samples:
        raise ValueError(f"start must be in [0, {num_samples}], got {start}")
    generator = torch.Generator().manual_seed(int(seed) + int(epoch))
    if modality_lengths is not None:
        if len(modality_lengths) != num_samples:
            raise ValueError(f"modality_lengths must have {num_samples} entries, got "
                             f"{len(modality_lengths)}")
        if not isinstance(grad_accum, int) or grad_accum < 1:
            raise ValueError(f"grad_accum must be an int >= 1, got {grad_accum!r}")
        order = modality_length_grouped_indices(modality_lengths, batch_size,
                                                world_size * grad_accum, generator)
    elif shuffle:
        order = torch.randperm(num_samples, generator=generator).tolist()
    else:
        order = list(range(num_samples))
    size = batch_size * world_size
    remaining = order[start:]
    batches = [remaining[i:i + size] for i in range(0, len(remaining), size)]
    num_dropped = 0
    if batches and len(batches[-1]) < size and (drop_last or len(batches[-1]) < world_size):
        num_dropped = len(batches.pop())
    return EpochPlan(epoch=epoch, start=start, global_batches=batches, num_dropped=num_dropped)
