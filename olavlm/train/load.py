# Loading the model once (rank 0) and sharding it, instead of every rank holding the whole LLM.
"""``parallel.load``: how the ranks of an FSDP2 job get their weights.

- ``every_rank``: every rank builds the whole model with its weights (the LLM read from disk),
  then ``fully_shard`` keeps its shards: with 8 ranks per node, 8 copies of the LLM in host (or
  GPU) memory while building.
- ``rank0`` (the default; it applies when FSDP2 shards over several ranks): rank 0 builds the
  model with its weights exactly as one process does. Every other rank builds the same modules
  on the meta device (``build_model(meta=True)``: the LLM from its config.json alone, no weight
  read or allocated; the frozen vision tower is loaded as usual, then overwritten by rank 0's).
  All ranks apply the stage and the parallelism switches (``fully_shard`` leaves meta parameters
  on meta); then the meta ranks ``to_empty`` their shards and rank 0 sends every parameter and
  persistent buffer with ``set_model_state_dict(full_state_dict=True,
  broadcast_from_rank0=True)`` (one full tensor at a time), and the non-persistent buffers
  (RoPE's ``inv_freq``: not in the state dict, garbage after ``to_empty``) with plain
  broadcasts.

``prepare`` (before sharding) compares the structure of every rank with rank 0's: parameter
names, shapes, dtypes, requires_grad, which parameters are tied, buffers and their
persistence. A difference (a model whose ``from_config`` builds something else than its
``from_pretrained``) stops every rank, naming it: ``parallel.load=every_rank`` then works.
It also gives the meta ranks rank 0's RNG state: building drew random numbers on rank 0 only
(fresh heads, grown embeddings), and the run must go on exactly as with ``every_rank``, where
every rank drew the same ones. A resumed run loads its checkpoint after ``finish``, as before.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .parallel import DistInfo, wants_fsdp

__all__ = ["LOADS", "Loading", "finish", "load_mode", "prepare", "structure"]

logger = logging.getLogger("olavlm.train")

LOADS = ("rank0", "every_rank")


def load_mode(cfg, world_size: int) -> str:
    """The mode in effect: "rank0" when ``cfg.load`` asks for it and FSDP2 shards over several
    ranks; otherwise "every_rank" (one process, or no sharding: each rank needs it all)."""
    if cfg.load not in LOADS:
        raise ValueError(f"parallel.load must be rank0 or every_rank, got {cfg.load!r}")
    if cfg.load == "rank0" and world_size > 1 and wants_fsdp(cfg, world_size):
        return "rank0"
    return "every_rank"


@dataclass
class Loading:
    """What ``prepare`` found and ``finish`` needs. ``on_meta``: this rank built the model on
    the meta device; ``llm_bytes``: bytes of LLM parameters this rank held before sharding
    (0 on meta ranks: the LLM was never materialized there in full)."""

    mode: str
    on_meta: bool
    llm_bytes: int
    full_state: dict | None = None  # rank 0 under "rank0": its state dict until sent
    buffers: list = field(default_factory=list)  # (module, name) of non-persistent buffers


def structure(model: nn.Module) -> list[tuple]:
    """One row per parameter (name, shape, dtype, requires_grad, the first name it is tied
    to) and per buffer (name, shape, dtype, persistent): what must match across ranks."""
    rows: list[tuple] = []
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        tied = first.setdefault(id(p), name)
        rows.append(("parameter", name, tuple(p.shape), str(p.dtype), p.requires_grad, tied))
    for name, module, key in _buffer_slots(model):
        buf = module._buffers[key]
        rows.append(("buffer", name, tuple(buf.shape), str(buf.dtype),
                     key not in module._non_persistent_buffers_set))
    return rows


def _buffer_slots(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    # Per module, not deduplicated: a buffer shared by two modules becomes two tensors under
    # to_empty, and each must be filled.
    return [(f"{prefix}.{key}" if prefix else key, module, key)
            for prefix, module in model.named_modules(remove_duplicate=False)
            for key, buf in module._buffers.items() if buf is not None]


def prepare(model: nn.Module, mode: str, dist_info: DistInfo) -> Loading:
    """Before sharding, on every rank (a collective under "rank0")."""
    on_meta = mode == "rank0" and not dist_info.is_main
    llm_bytes = sum(p.numel() * p.element_size() for p in model.llm.parameters()
                    if not p.is_meta)
    loading = Loading(mode, on_meta, llm_bytes)
    if mode != "rank0":
        return loading
    _agree_with_rank0(model, dist_info)
    loading.buffers = [(module, key) for name, module, key in _buffer_slots(model)
                       if key in module._non_persistent_buffers_set]
    if dist_info.is_main:
        # References to the model's own tensors (no copy); they outlive sharding until sent.
        loading.full_state = model.state_dict()
    return loading


def _agree_with_rank0(model: nn.Module, dist_info: DistInfo) -> None:
    import torch.distributed as dist

    mine = structure(model)
    device = dist_info.device
    rng = [torch.get_rng_state()]
    if device.type == "cuda":
        rng.append(torch.cuda.get_rng_state(device))
    box = [mine, rng] if dist_info.is_main else [None, None]
    dist.broadcast_object_list(box, src=0)
    problem = None if dist_info.is_main else _difference(box[0], mine)
    problems: list = [None] * dist_info.world_size
    dist.all_gather_object(problems, problem)  # every rank stops, not only the odd one
    bad = [(rank, p) for rank, p in enumerate(problems) if p]
    if bad:
        rank, text = bad[0]
        raise ValueError(f"parallel.load=rank0: the model rank {rank} built on the meta device "
                         f"differs from rank 0's ({text}); set parallel.load=every_rank")
    if not dist_info.is_main:
        torch.set_rng_state(box[1][0])
        if device.type == "cuda":
            torch.cuda.set_rng_state(box[1][1], device)


def _difference(want: list[tuple], got: list[tuple]) -> str | None:
    if want == got:
        return None
    by_name = {row[:2]: row for row in got}
    diffs = []
    for row in want:
        other = by_name.pop(row[:2], None)
        if other != row:
            diffs.append(f"{row[0]} {row[1]}: rank 0 {row[2:]}, here "
                         f"{'missing' if other is None else other[2:]}")
    diffs += [f"{kind} {name}: only here" for kind, name in by_name]
    if not diffs:
        diffs = ["the same entries in another order"]
    more = f"; {len(diffs) - 3} more" if len(diffs) > 3 else ""
    return "; ".join(diffs[:3]) + more


@torch.no_grad()
def finish(model: nn.Module, loading: Loading, device: torch.device) -> None:
    """After sharding, on every rank (collectives under "rank0"): the meta ranks allocate their
    shards and everyone gets rank 0's values."""
    if loading.mode != "rank0":
        return
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    start = time.perf_counter()
    if loading.on_meta:
        model.to_empty(device=device)
    sent = 0
    if loading.full_state is not None:
        sent = sum(v.numel() * v.element_size() for v in loading.full_state.values()
                   if isinstance(v, torch.Tensor))
    # Other ranks pass {}: the keys, shapes and dtypes come from rank 0, one tensor at a time.
    set_model_state_dict(model, loading.full_state or {}, options=StateDictOptions(
        full_state_dict=True, broadcast_from_rank0=True))
    loading.full_state = None  # rank 0's full copy can go now
    for module, key in loading.buffers:
        buf = module._buffers[key]
        box = buf if buf.is_contiguous() else buf.contiguous()
        dist.broadcast(box, src=0)
        if box is not buf:
            buf.copy_(box)
    _check_materialized(model)
    if dist.get_rank() == 0:
        logger.info("parallel.load=rank0: sent %.1f MB of weights and %d non-persistent buffers "
                    "to the other %d ranks in %.1f s", sent / 2**20, len(loading.buffers),
                    dist.get_world_size() - 1, time.perf_counter() - start)


def _check_materialized(model: nn.Module) -> None:
    """No tensor left on the meta device: a module keeping a plain tensor attribute (neither
    parameter nor buffer) would fail at its first forward instead, far from the cause."""
    left = [n for n, p in model.named_parameters() if p.is_meta]
    left += [n for n, b in model.named_buffers() if b.is_meta]
    for prefix, module in model.named_modules():
        left += [f"{prefix}.{k}" for k, v in vars(module).items()
                 if isinstance(v, torch.Tensor) and v.is_meta]
    if left:
        raise RuntimeError(f"parallel.load=rank0: {left[:5]} still on the meta device after "
                           "loading (not a parameter or buffer rank 0 could send); set "
                           "parallel.load=every_rank")
