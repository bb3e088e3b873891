# Collation and the resumable, distributed data loader (state: epoch, position, RNG seed).
"""Batches for the model and a loader whose position a checkpoint can save and restore.

``Collator`` right-pads a list of ``Sample`` into a ``Batch``; rejected samples (``Reject``
items, from ``on_bad_sample="skip"``) are left out and passed along in ``Batch.rejects`` so the
main process counts and logs them. ``ResumableLoader`` wraps a ``torch.utils.data.DataLoader``
(worker processes, pinned memory) around an epoch plan (sampler.py) and keeps
``(epoch, position)``: ``state_dict()`` after a step and ``load_state_dict()`` in a new run
continue exactly after the last batch handed out, whatever was prefetched.

Typical use::

    loader = ResumableLoader(dataset, batch_size=16, num_workers=4, seed=0)
    loader.load_state_dict(checkpoint["data"])       # when resuming
    while loader.epoch < num_epochs:
        for batch in loader:                         # the rest of the current epoch
            step(batch.to("cuda"))
            checkpoint["data"] = loader.state_dict()
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import signal
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .bad_data import FIRST_KEPT, BadSampleError, Reject, RejectLog
from .images import ImageView
from .llava import LlavaDataset, Sample
from .sampler import EpochPlan, plan_epoch
from .templates import IGNORE_INDEX

__all__ = ["Batch", "Collator", "LoaderStateMismatch", "ResumableLoader",
           "TooManyRejectsError"]

# The reject rate is judged only after this many samples of an epoch (this rank's share): a
# few bad samples among the first batches must not stop a run.
REJECT_CHECK_AFTER = 64


def _ignore_stop_signals(_worker_id: int) -> None:
    """Data workers ignore SIGTERM and SIGINT: a scheduler's preemption (SLURM's scancel, a
    requeue) and Ctrl-C signal the whole process group, and a worker killed by one would end
    the run with "DataLoader worker killed by signal" before the trainer (olavlm.train.signals)
    finishes its step and writes the checkpoint. The parent stops the workers itself."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _sample_name(dataset, i: int) -> str:
    """``dataset``'s sample ``i`` for a message: its location (``file:line``) and id."""
    try:
        location = dataset.index.location(i)
        return f"sample {i} ({location}, id {dataset.index.entry(i).get('id')!r})"
    except Exception:  # noqa: BLE001 - only a message: never hide the error it explains
        return f"sample {i}"


class _NamingErrors(torch.utils.data.Dataset):
    """The dataset, with the sample named on any exception its ``__getitem__`` raises (a bug,
    a full disk... not bad data, which comes back as a ``Reject``): the error propagates with
    its type (the DataLoader re-raises a worker's), and a note saying which sample it was."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        try:
            return self.dataset[i]
        except BadSampleError:  # (on_bad_sample="raise": its message names the sample)
            raise
        except Exception as err:
            err.add_note(f"(while loading {_sample_name(self.dataset, i)})")
            raise


# torch's messages for a worker process that died (no Python exception to re-raise).
_WORKER_DIED = re.compile(r"DataLoader worker \(pid")


def _a_worker_died(iterator, wait: float = 2.0) -> bool:
    """Whether one of ``iterator``'s worker processes has exited (polled up to ``wait`` s)."""
    workers = getattr(iterator, "_workers", [])
    deadline = time.monotonic() + wait
    while workers:
        if any(not proc.is_alive() for proc in workers):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return False


def rank_rejects_path(path: str | Path, rank: int, world_size: int) -> Path:
    """The rejects file a rank writes: ``path`` itself in one process, else ``.rank<r>`` added
    before its suffix (``rejects.rank1.jsonl``)."""
    path = Path(path)
    return path if world_size == 1 else path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


class TooManyRejectsError(ValueError):
    """More of the data was rejected than ``max_reject_fraction`` allows: most likely a wrong
    ``image_folder`` or data file, which would otherwise train on what little is left."""

logger = logging.getLogger("olavlm.data")

_STATE_VERSION = 1


class LoaderStateMismatch(ValueError):
    """A loader state saved over other data or ordering options (``load_state_dict``): resuming
    from it would visit the samples in another order."""


@dataclasses.dataclass
class Batch:
    """A collated batch of B samples padded on the right to length T.

    input_ids:      (B, T) int64; the image placeholder is IMAGE_TOKEN_INDEX (-200), padding
                    is the tokenizer's pad id
    labels:         (B, T) int64; IGNORE_INDEX (-100) wherever nothing is supervised
    attention_mask: (B, T) bool; True on real tokens
    images:         (B, 3, S, S) float32 encoder views (zeros for text-only samples)
    image_mask:     (B,) int64; 1 for a sample with an image, 0 for a text-only one
    raw_images:     B uint8 (3, H, W) tensors for the teachers (None if not kept)
    teacher_views:  name -> (B, 3, s, s)
    image_keys:     B target-cache keys (None for text-only samples)
    targets:        task -> (B, *shape) cached targets (empty without a target cache)
    target_mask:    (B,) int64; 1 where the sample has an image AND its cached targets (the
                    embedding losses' mask with a cache); None without a target cache
    target_rejects: the image samples of this batch whose targets were missing or damaged
    maps:           name -> B (H, W) tensors, the synthetic dataset's maps (None if not kept)
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    images: torch.Tensor
    image_mask: torch.Tensor
    raw_images: list[torch.Tensor] | None
    teacher_views: dict[str, torch.Tensor]
    sample_ids: list[str]
    indices: list[int]
    num_truncated: int = 0
    num_unlabelled: int = 0  # samples without a next-token label (only the heads learn)
    rejects: list[Reject] = dataclasses.field(default_factory=list)
    image_keys: list[str | None] = dataclasses.field(default_factory=list)
    targets: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    target_mask: torch.Tensor | None = None
    target_rejects: list[Reject] = dataclasses.field(default_factory=list)
    maps: dict[str, list[torch.Tensor]] | None = None
    stand_in: bool = False  # see ``as_stand_in``

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def as_stand_in(self) -> Batch:
        """This batch with nothing to learn from: every label IGNORE_INDEX and every target
        masked (``target_mask`` zeros; the images stay, so the forward has the same shape).
        A rank whose batch was rejected whole runs it in its place, so that its forward and
        backward (and their collectives) match the other ranks' while adding nothing to the
        step: no next-token term, no embedding term. Not counted as samples."""
        return dataclasses.replace(
            self, labels=torch.full_like(self.labels, IGNORE_INDEX),
            target_mask=torch.zeros_like(self.image_mask), num_truncated=0, num_unlabelled=0,
            rejects=[], target_rejects=[], stand_in=True)

    def _map(self, fn) -> Batch:
        return dataclasses.replace(
            self,
            input_ids=fn(self.input_ids), labels=fn(self.labels),
            attention_mask=fn(self.attention_mask), images=fn(self.images),
            image_mask=fn(self.image_mask),
            raw_images=None if self.raw_images is None else [fn(t) for t in self.raw_images],
            teacher_views={k: fn(v) for k, v in self.teacher_views.items()},
            targets={k: fn(v) for k, v in self.targets.items()},
            target_mask=None if self.target_mask is None else fn(self.target_mask),
            maps=None if self.maps is None else {k: [fn(t) for t in v]
                                                 for k, v in self.maps.items()},
        )

    def pin_memory(self) -> Batch:
        """Called by the DataLoader's pinning thread (pin_memory=True)."""
        return self._map(lambda t: t.pin_memory())

    def to(self, device, non_blocking: bool = True) -> Batch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))


class Collator:
    """Right-pads samples into a Batch (``pad_to_multiple_of`` rounds T up, e.g. to 8 for
    tensor-core friendly shapes)."""

    def __init__(self, pad_token_id: int, image_view: ImageView,
                 teacher_views: dict[str, ImageView] | None = None, pad_to_multiple_of: int = 1):
        if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int):
            raise TypeError(f"pad_token_id must be an int, got {pad_token_id!r}")
        if not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be an int >= 1, got {pad_to_multiple_of!r}")
        self.pad_token_id = pad_token_id
        self.image_view = image_view
        self.teacher_views = dict(teacher_views or {})
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, items: list[Sample | Reject]) -> Batch:
        samples = [s for s in items if isinstance(s, Sample)]
        rejects = [s for s in items if isinstance(s, Reject)]
        n = len(samples)
        longest = max((len(s.input_ids) for s in samples), default=0)
        length = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((n, length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((n, length), dtype=torch.bool)
        for row, s in enumerate(samples):
            t = len(s.input_ids)
            input_ids[row, :t] = s.input_ids
            labels[row, :t] = s.labels
            attention_mask[row, :t] = True
        size = self.image_view.size
        images = (torch.stack([s.image for s in samples]) if samples
                  else torch.zeros(0, 3, size, size, dtype=self.image_view.blank().dtype))
        teacher_views = {}
        for name, view in self.teacher_views.items():
            empty = torch.zeros((0, 3, view.out_size, view.out_size), dtype=view.blank().dtype)
            teacher_views[name] = (torch.stack([s.teacher_views[name] for s in samples])
                                   if samples else empty)
        keep_raw = all(s.raw_image is not None for s in samples)
        with_targets = bool(samples) and all(s.targets for s in samples)
        with_maps = bool(samples) and all(s.maps is not None for s in samples)
        return Batch(
            input_ids=input_ids, labels=labels, attention_mask=attention_mask, images=images,
            image_mask=torch.tensor([int(s.has_image) for s in samples], dtype=torch.long),
            raw_images=[s.raw_image for s in samples] if keep_raw else None,
            teacher_views=teacher_views,
            sample_ids=[s.sample_id for s in samples], indices=[s.index for s in samples],
            num_truncated=sum(int(s.truncated) for s in samples), rejects=rejects,
            num_unlabelled=sum(int(not (s.labels != IGNORE_INDEX).any()) for s in samples),
            image_keys=[s.image_key for s in samples],
            targets=({t: torch.stack([s.targets[t] for s in samples]) for t in samples[0].targets}
                     if with_targets else {}),
            target_mask=(torch.tensor([int(s.has_image and s.target_present) for s in samples],
                                      dtype=torch.long) if with_targets else None),
            target_rejects=[s.target_problem for s in samples if s.target_problem is not None],
            maps=({k: [s.maps[k] for s in samples] for k in samples[0].maps}
                  if with_maps else None),
        )


class _PlanBatchSampler(torch.utils.data.Sampler):
    """Hands the DataLoader the current plan's batches for this rank (set before each epoch)."""

    def __init__(self):
        self.batches: list[list[int]] = []

    def __iter__(self):
        return iter(list(self.batches))

    def __len__(self) -> int:
        return len(self.batches)


def _dist_rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    initialized = dist.is_available() and dist.is_initialized()
    if world_size is None:
        world_size = dist.get_world_size() if initialized else 1
    if rank is None:
        rank = dist.get_rank() if initialized else 0
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
    return rank, world_size


class ResumableLoader:
    """Iterates a ``LlavaDataset`` epoch by epoch; its state resumes mid-epoch exactly.

    ``batch_size`` is per rank. ``rank``/``world_size`` default to torch.distributed's (0/1
    when it is not initialized); each rank iterates its slice of the same global batches.
    ``iter(loader)`` yields the rest of the current epoch, then advances ``epoch`` and logs
    the epoch's summary (samples used, rejected per reason, truncated, dropped). Batches may
    hold fewer than ``batch_size`` samples: the last one of an epoch, and any with rejected
    samples. ``rejects_path`` gets one JSON line per reject (``.rank<r>`` added when
    ``world_size > 1``; the index-time rejects are written by rank 0 only).
    ``max_reject_fraction`` (< 1) stops iteration with ``TooManyRejectsError`` when more than
    that fraction of the entries was rejected while indexing, or, once this rank has seen
    ``REJECT_CHECK_AFTER`` samples of an epoch, of the samples loaded so far in it.
    """

    def __init__(
        self,
        dataset: LlavaDataset,
        *,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        group_by_modality_length: bool = False,
        drop_last: bool = False,
        rejects_path: str | Path | None = None,
        pad_to_multiple_of: int = 1,
        prefetch_factor: int = 2,
        grad_accum: int = 1,
        max_reject_fraction: float = 1.0,
    ):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
        if not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank, self.world_size = _dist_rank_world(rank, world_size)
        self.group_by_modality_length = group_by_modality_length
        if isinstance(grad_accum, bool) or not isinstance(grad_accum, int) or grad_accum < 1:
            raise ValueError(f"grad_accum must be an int >= 1, got {grad_accum!r}")
        self.grad_accum = grad_accum  # the grouping's megabatch spans one optimizer step
        if not 0.0 <= float(max_reject_fraction) <= 1.0:
            raise ValueError(f"max_reject_fraction must be in [0, 1], got {max_reject_fraction!r}")
        self.max_reject_fraction = float(max_reject_fraction)
        self._legacy_epoch: int | None = None  # see load_state_dict
        self.drop_last = drop_last
        self._index_rejects_path = None  # rank 0's file: the only one with the index rejects
        if rejects_path is not None and self.world_size > 1:
            rejects_path, self._index_rejects_path = (
                rank_rejects_path(rejects_path, r, self.world_size) for r in (self.rank, 0))
        self.log = RejectLog(rejects_path)
        # The index's rejects (found once, while indexing) go to the file at the first pass,
        # unless the state loaded says an earlier run of this training wrote them already.
        self._index_rejects_pending = self.rank == 0
        self.epoch = 0
        self.position = 0  # global samples of this epoch already handed out (all ranks)
        self.job_stats: dict | None = None  # (state_dict's "job_stats"; the trainer's)
        self.job_rejects_files: list | None = None  # (state_dict's "job_rejects_files")
        self.last_summary: str | None = None  # of the last finished epoch
        self.last_first_rejects: list = []  # its first few rejects (bad_data.Reject)
        self.last_stats: dict | None = None  # its counts (RejectLog.state_dict())
        self._start_epoch_log()
        if pin_memory is None:
            pin_memory = torch.cuda.is_available()
        elif pin_memory and not torch.cuda.is_available():
            warnings.warn("pin_memory=True needs a CUDA device; not pinning", stacklevel=2)
            pin_memory = False
        if num_workers > 0:
            # Each worker tokenizes one sample at a time; the Rust thread pool would only
            # oversubscribe the cores (and it warns when forked after being used).
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self._batch_sampler = _PlanBatchSampler()
        self.collator = collator = Collator(dataset.tokenizer.pad_token_id, dataset.image_view,
                                            dataset.teacher_views, pad_to_multiple_of)
        # No persistent workers: each pass starts its own (a fork costs milliseconds), so a
        # break or an error mid-epoch never leaves workers behind with a stale position.
        extra = {"prefetch_factor": prefetch_factor} if num_workers else {}
        # Its own generator: every iter(DataLoader) draws a worker base seed, and from the global
        # RNG that draw would happen at an epoch's start in one run but mid-epoch in a resumed
        # one, so a model with dropout would not continue exactly after a resume.
        self._dataloader = torch.utils.data.DataLoader(
            _NamingErrors(dataset), batch_sampler=self._batch_sampler, collate_fn=collator,
            num_workers=num_workers, pin_memory=pin_memory,
            worker_init_fn=_ignore_stop_signals if num_workers else None,
            generator=torch.Generator().manual_seed(int(seed)), **extra)

    def stand_in_batch(self) -> Batch:
        """One text-only sample made up here (``LlavaDataset.stand_in_sample``) as a stand-in
        batch (``Batch.as_stand_in``: nothing to learn from, not counted): for a rank whose
        batch was rejected whole before it had one of its own (the ranks' steps must match).
        Draws nothing from the data: the loader's position and counts are unchanged."""
        return self.collator([self.dataset.stand_in_sample()]).as_stand_in()

    def _start_epoch_log(self) -> None:
        self.log.reset()
        for reject in self.dataset.index.rejects:  # counted in every epoch's summary
            self.log.counts[reject.reason] += 1
            if len(self.log.first) < FIRST_KEPT:
                self.log.first.append(reject)

    def plan(self) -> EpochPlan:
        """The global batches left in the current epoch."""
        lengths = self.dataset.modality_lengths if self.group_by_modality_length else None
        return plan_epoch(len(self.dataset), epoch=self.epoch, start=self.position,
                          batch_size=self.batch_size, world_size=self.world_size,
                          shuffle=self.shuffle, seed=self.seed, modality_lengths=lengths,
                          drop_last=self.drop_last,
                          grad_accum=1 if self.epoch == self._legacy_epoch else self.grad_accum)

    def __len__(self) -> int:
        """Batches in a whole epoch for this rank."""
        size = self.batch_size * self.world_size
        full, rest = divmod(len(self.dataset), size)
        return full + int(rest > 0 and not self.drop_last and rest >= self.world_size)

    def _check_reject_rate(self) -> None:
        if self.max_reject_fraction >= 1.0:
            return
        index_rejects = self.dataset.index.rejects
        num_index = len(index_rejects)
        total = len(self.dataset) + num_index
        if total and num_index / total > self.max_reject_fraction:
            listed = self._index_rejects_path or self.log.path  # rank 0 alone writes them
            self._too_many(num_index, total, "entries of the data file(s) were rejected while "
                           "indexing", index_rejects[0], listed)
        loaded_rejects = self.log.num_rejected - num_index
        seen = self.log.num_samples + loaded_rejects
        if seen >= REJECT_CHECK_AFTER and loaded_rejects / seen > self.max_reject_fraction:
            self._too_many(loaded_rejects, seen, f"samples loaded so far in epoch {self.epoch} "
                           "were rejected", self._last_reject)

    def _too_many(self, bad: int, seen: int, what: str, example, listed=None) -> None:
        reasons = ", ".join(f"{r}={n}" for r, n in sorted(self.log.counts.items()))
        listed = listed or self.log.path
        eg = f"; e.g. {example.reason} at {example.location}: {example.detail}" \
            if example is not None else ""
        raise TooManyRejectsError(
            f"{bad} of {seen} {what} ({reasons}){eg}; more than max_reject_fraction="
            f"{self.max_reject_fraction:g}: check the data path and image folder (the rejects "
            f"are listed in {listed or 'the log'}), or raise data.max_reject_fraction "
            "(1.0 never stops)")

    def _write_index_rejects(self) -> None:
        if self._index_rejects_pending:
            for reject in self.dataset.index.rejects:
                self.log.write(reject)
            self._index_rejects_pending = False

    def __iter__(self):
        self._last_reject = None
        self._write_index_rejects()  # (before the rate check: its message points to the file)
        self._check_reject_rate()
        plan = self.plan()
        self._batch_sampler.batches = plan.rank_batches(self.rank, self.world_size)
        iterator = iter(self._dataloader)  # fresh workers, which start at `position`
        try:
            for k, batch in enumerate(self._naming_dead_workers(iterator)):
                self.position += len(plan.global_batches[k])
                self.log.num_samples += len(batch)
                self.log.num_truncated += batch.num_truncated
                self.log.num_unlabelled += batch.num_unlabelled
                for reject in batch.rejects:
                    self.log.add(reject, epoch=self.epoch)
                    self._last_reject = reject
                for problem in batch.target_rejects:
                    self.log.add_target_problem(problem, epoch=self.epoch)
                self._check_reject_rate()
                yield batch
        finally:
            # Stop the workers now (on a break or an error too): an iterator kept alive by a
            # traceback would otherwise be collected later, possibly inside another loader's
            # forked worker, which cannot stop them.
            shutdown = getattr(iterator, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
        self.log.num_dropped += plan.num_dropped
        self._end_epoch()

    def _naming_dead_workers(self, iterator):
        """``iterator``'s batches; a worker that died (killed by the OOM killer, a crash in a
        native decoder) raises torch's RuntimeError with the samples it was loading named."""
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                return
            except (RuntimeError, EOFError, ConnectionError) as err:
                # (a worker killed while its queue thread was sending the previous batch leaves
                # a cut message: torch re-raises the EOFError when it looks before the process
                # is reaped)
                died = (_WORKER_DIED.match(str(err)) if isinstance(err, RuntimeError)
                        else _a_worker_died(iterator))
                if not died:
                    raise
                raise RuntimeError(self._dead_worker_message(err, iterator)) from err
            yield batch

    def _dead_worker_message(self, err: RuntimeError, iterator) -> str:
        # (torch's iterator internals: the pending batch numbers of each worker, best effort)
        workers = getattr(iterator, "_workers", [])
        dead = {w for w, proc in enumerate(workers) if not proc.is_alive()}
        pending = sorted(k for k, info in getattr(iterator, "_task_info", {}).items()
                         if len(info) == 1 and info[0] in dead)
        batches = self._batch_sampler.batches
        indices = [i for k in pending if k < len(batches) for i in batches[k]]
        listed = "; ".join(_sample_name(self.dataset, i) for i in indices[:8])
        more = f" and {len(indices) - 8} more" if len(indices) > 8 else ""
        held = (f": it was loading {listed}{more}, one of which killed it" if indices else "")
        return (f"{err} in epoch {self.epoch}{held} (a crash in native code such as an image "
                "decoder, or the out-of-memory killer: see the system log, dmesg)")

    def epoch_so_far(self) -> tuple[str, bool] | None:
        """(summary, anything rejected, dropped or without targets) of the epoch in progress,
        or None before its first batch. A run that stops at train.max_steps mid-epoch (one
        epoch of a recipe: the last batches dropped, or max_steps inside it) never ends its
        epoch, so the trainer reports this at the end instead of the epoch's summary."""
        if self.position == 0:
            return None
        noisy = bool(self.log.num_rejected or self.log.num_dropped
                     or self.log.num_target_problems)
        return self._rank_tag() + self.log.summary(self.epoch) + " (so far)", noisy

    def stats_so_far(self) -> tuple[int, dict, bool] | None:
        """(epoch, this rank's counts (``RejectLog.state_dict()``), whether the epoch is in
        progress) of the epoch in progress, else of the last finished one; None before any
        batch. The trainer sums them over the ranks for the run's summary."""
        if self.position:
            return self.epoch, self.log.state_dict(), True
        if self.last_stats is not None:
            return self.epoch - 1, self.last_stats, False
        return None

    def index_reject_counts(self) -> Counter:
        """The index's rejects by reason: counted in every rank's epoch (``_start_epoch_log``)."""
        return Counter(r.reason for r in self.dataset.index.rejects)

    def _rank_tag(self) -> str:
        return f"rank {self.rank}: " if self.world_size > 1 else ""

    def _end_epoch(self) -> None:
        self.last_summary = self._rank_tag() + self.log.summary(self.epoch)
        self.last_stats = self.log.state_dict()
        self.last_first_rejects = list(self.log.first)  # (its first few, for messages)
        noisy = self.log.num_rejected or self.log.num_dropped or self.log.num_target_problems
        level = logging.WARNING if noisy else logging.INFO
        logger.log(level, "data: %s", self.last_summary)
        self.epoch += 1
        self.position = 0
        self._start_epoch_log()

    def state_dict(self) -> dict:
        """Everything needed to continue after the last batch handed out. The shuffling RNG
        is a pure function of (seed, epoch), so the seed is its whole state."""
        return {
            "version": _STATE_VERSION, "epoch": self.epoch, "position": self.position,
            "seed": self.seed, "shuffle": self.shuffle,
            "group_by_modality_length": self.group_by_modality_length,
            "batch_size": self.batch_size, "world_size": self.world_size,
            "grad_accum": self.grad_accum,
            "drop_last": self.drop_last, "num_samples": len(self.dataset),
            "data_digest": self._data_digest(),
            "stats": self.log.state_dict(),
            # every rank's counts summed (set by the trainer before a checkpoint): what a resume
            # with another number of ranks continues from (``load_state_dict``)
            "job_stats": self.job_stats,
            "job_rejects_files": self.job_rejects_files,  # every rank's file_state(), as above
            "index_rejects_written": not self._index_rejects_pending,  # (never pending off rank 0)
            "rejects_file": self.log.file_state(),
        }

    def _data_digest(self) -> str:
        """16 hex digits (BLAKE2b) of the entries' signed word counts in order: an entry added
        and another removed keeps the count but shifts every later index (the resumed epoch
        would repeat some samples and skip others), which this tells."""
        digest = getattr(self, "_digest", None)
        if digest is None:
            lengths = np.ascontiguousarray(self.dataset.modality_lengths, dtype="<i4")
            digest = self._digest = hashlib.blake2b(lengths.tobytes(), digest_size=8).hexdigest()
        return digest

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``'s output. The dataset and the ordering options must match;
        batch size and world size may change unless the order depends on them (grouping)."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"state['version'] must be {_STATE_VERSION}, got "
                             f"{state.get('version')!r}")
        mine = {"num_samples": len(self.dataset), "seed": self.seed, "shuffle": self.shuffle,
                "group_by_modality_length": self.group_by_modality_length,
                "drop_last": self.drop_last}
        legacy = self.group_by_modality_length and "grad_accum" not in state
        if self.group_by_modality_length:  # the grouped order depends on them
            mine["batch_size"] = self.batch_size
            if legacy:
                mine["world_size"] = self.world_size
            else:  # megabatches of world_size x grad_accum batches: only the product counts
                steps = int(state.get("world_size", 0)) * int(state.get("grad_accum", 0))
                if steps != self.world_size * self.grad_accum:
                    raise LoaderStateMismatch(
                        f"state: world_size x grad_accum must be {self.world_size} x "
                        f"{self.grad_accum} = {self.world_size * self.grad_accum} (this "
                        f"loader's; the length grouping's megabatch), got "
                        f"{state.get('world_size')} x {state.get('grad_accum')} = {steps}: "
                        "resuming would visit samples in another order (keep the product: "
                        "fewer ranks, more grad_accum)")
        for key, value in mine.items():
            if state.get(key) != value:
                what = (f"the data changed: {state.get(key)!r} samples when the state was "
                        f"saved, {value!r} now" if key == "num_samples" else
                        f"state[{key!r}] must be {value!r} (this loader's), got "
                        f"{state.get(key)!r}")
                raise LoaderStateMismatch(f"{what}: resuming would visit samples in another "
                                          "order")
        # (states from before the key: the count only)
        if state.get("data_digest", self._data_digest()) != self._data_digest():
            raise LoaderStateMismatch(
                f"the data changed: its {len(self.dataset)} entries are not the ones the state "
                "was saved over (their lengths in words differ: entries added and removed, or "
                "edited): resuming would repeat some samples and skip others")
        position = int(state["position"])
        if not 0 <= position <= len(self.dataset):
            raise ValueError(f"state['position'] must be in [0, {len(self.dataset)}], got "
                             f"{position}")
        self.epoch = int(state["epoch"])
        self.position = position
        # A state saved before the grouping's megabatch spanned grad_accum micro-batches: finish
        # its epoch in the order it was started (megabatch world x batch), then use grad_accum.
        self._legacy_epoch = self.epoch if legacy else None
        stats = state.get("stats", {})
        saved_world = int(state.get("world_size", self.world_size))
        if saved_world != self.world_size:
            # This rank's file is rank 0's (or its own of another geometry): continuing its
            # counts would drop the other ranks' (fewer ranks now) or count rank 0's twice
            # (more). Rank 0 takes the job's counts; the others start from the index's rejects,
            # which every rank's epoch counts (the run summary keeps them once).
            job = state.get("job_stats") or (stats if saved_world == 1 else None)
            if self.rank != 0:
                stats = {"counts": dict(self.index_reject_counts())}
            elif job is not None:
                stats = job
            else:  # (rank 0's own file: the others' counts are not in it)
                logger.warning("the epoch's data counts so far cover rank 0 of %d only (a "
                               "checkpoint from before they were summed)", saved_world)
        self.log.load_state_dict(stats)
        self.log.rewind_file(state.get("rejects_file"))
        if saved_world != self.world_size and self.rank == 0:  # files of the old names
            self.log.rewind_files(state.get("job_rejects_files")
                                  or [state.get("rejects_file")])
        # (states from before this key: their run wrote the index rejects when it started)
        if state.get("index_rejects_written", True):
            self._index_rejects_pending = False
