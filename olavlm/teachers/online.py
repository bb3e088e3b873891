# Online targets: the teachers run on the training device, batched once per step.
"""``OnlineTargets`` runs the teachers on a training batch and reports what they cost.

Typical use in a step::

    online = OnlineTargets(build_teachers("depth,seg,gen", weights, device="cuda"),
                           compile=True, side_stream=True)
    pending = online.submit(batch)          # teachers start on their own CUDA stream
    hidden = llm_forward(batch)             # ... overlapping the LLM forward
    targets = pending.wait()                # the current stream waits for the teachers
    loss = losses(hidden, targets.targets, targets.mask)
    metrics |= online.metrics()             # teacher weights, peak memory, time

Each teacher gets ``batch.teacher_views[teacher.name]`` when the loader computed its host view
(``LlavaDataset(teacher_views={t.name: t.host_view()})``, the seed's exact PIL pixels), else
``batch.raw_images`` (resized on the device); the synthetic teacher gets ``batch.maps``. The
mask is ``batch.image_mask``: text-only samples get targets (of their black image) but mask 0.

``side_stream`` needs CUDA; elsewhere it warns once and runs inline. The teachers' outputs are
recorded on the consuming stream (``record_stream``) so the allocator never reuses them early.
"""
from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch

from .base import Teacher, warn_once

__all__ = ["OnlineTargets", "PendingTargets", "TeacherTargets", "WaitingTargets"]


class TeacherTargets(NamedTuple):
    """targets: {task: (B, *shape)} on the teachers' device; mask: (B,) int64, 1 = real image."""

    targets: dict[str, torch.Tensor]
    mask: torch.Tensor


class PendingTargets:
    """Targets being computed on a side stream; ``wait()`` makes the current stream wait.
    ``lazy()`` hands them to ``OlaVLM.forward`` unwaited: it reads them after the LLM forward."""

    def __init__(self, result: TeacherTargets, done: torch.cuda.Event | None, device=None):
        self._result, self._done, self._device = result, done, device

    def lazy(self) -> WaitingTargets:
        return WaitingTargets(self)

    def wait(self) -> TeacherTargets:
        if self._done is not None:
            stream = torch.cuda.current_stream(self._device)
            stream.wait_event(self._done)
            for t in (*self._result.targets.values(), self._result.mask):
                t.record_stream(stream)
            self._done = None
        return self._result


class WaitingTargets(Mapping):
    """``{task: target}`` of a ``PendingTargets``: the shapes at once (``shape_of``), a value
    only after the current stream waits for the side stream (the first ``[task]`` waits). The
    model checks shapes before its LLM forward and reads values after it, so the teachers
    overlap the vision tower and the decoder."""

    def __init__(self, pending: PendingTargets) -> None:
        self._pending = pending

    def shape_of(self, task: str) -> torch.Size:
        return self._pending._result.targets[task].shape

    def __getitem__(self, task: str) -> torch.Tensor:
        return self._pending.wait().targets[task]

    def __contains__(self, task) -> bool:  # (Mapping's would read the value: wait)
        return task in self._pending._result.targets

    def __iter__(self):
        return iter(self._pending._result.targets)

    def __len__(self) -> int:
        return len(self._pending._result.targets)


def _device_tensors(batch):
    tensors = [batch.image_mask, *(batch.raw_images or []), *batch.teacher_views.values()]
    tensors += [t for v in (batch.maps or {}).values() for t in v]
    return [t for t in tensors if t.is_cuda]


class OnlineTargets:
    """Teachers run batched on the training device (module docstring).

    ``compile`` compiles each teacher's model forward; ``measure_memory_steps`` is how many
    calls measure the teachers' peak CUDA memory (it resets the CUDA peak statistics, so it is
    done only on the first calls, before the trainer reads its own peak).
    """

    def __init__(self, teachers: Sequence[Teacher], *, compile: bool = False,
                 side_stream: bool = False, measure_memory_steps: int = 1):
        teachers = list(teachers)
        if not teachers or not all(isinstance(t, Teacher) for t in teachers):
            raise TypeError(f"teachers must be a non-empty list of Teacher, got {teachers!r}")
        seen: dict[str, str] = {}
        for t in teachers:  # (as build_teachers: one task's targets would replace another's)
            for task in t.tasks:
                if task in seen:
                    raise ValueError(f"teachers {seen[task]!r} and {t.name!r} both produce the "
                                     f"{task!r} target; use one")
                seen[task] = t.name
        devices = {t.device for t in teachers}
        if len(devices) != 1:
            raise ValueError(f"teachers must share one device, got {sorted(map(str, devices))}")
        self.teachers = teachers
        self.device = teachers[0].device
        if compile:
            for t in teachers:
                t.compile_model()
        self.side_stream = None
        if side_stream:
            if self.device.type == "cuda":
                self.side_stream = torch.cuda.Stream(self.device)
            else:
                warn_once(f"side_stream=True needs a CUDA device, the teachers are on "
                          f"{self.device}; running them inline")
        self.measure_memory_steps = measure_memory_steps
        self._calls = 0
        self._peak_bytes: int | None = None
        self._last_ms: float | None = None
        self._events: tuple | None = None

    @property
    def tasks(self) -> dict[str, tuple[int, ...]]:
        return {k: v for t in self.teachers for k, v in t.target_shapes().items()}

    def _inputs(self, batch, teacher: Teacher):
        images = None
        if teacher.needs_images:
            images = batch.teacher_views.get(teacher.name)
            if images is None:
                images = batch.raw_images
            if images is None:
                raise ValueError(f"batch must carry raw_images (LlavaDataset(keep_raw_image="
                                 f"True)) or teacher_views[{teacher.name!r}] for the "
                                 f"{teacher.name} teacher, got neither")
        maps = batch.maps if teacher.needs_maps else None
        if teacher.needs_maps and maps is None:
            raise ValueError(f"batch must carry maps (LlavaDataset(keep_maps=True)) for the "
                             f"{teacher.name} teacher, got None")
        return images, maps

    def _run(self, batch) -> TeacherTargets:
        out = {}
        for teacher in self.teachers:
            images, maps = self._inputs(batch, teacher)
            # Teachers return inference tensors, which autograd refuses to save for backward
            # (the losses save their targets): one copy makes them normal tensors.
            out.update({k: v.clone() for k, v in teacher(images, maps=maps).items()})
        mask = batch.image_mask.to(self.device, non_blocking=True)
        return TeacherTargets(out, mask)

    def _measured(self, batch, on_side_stream: bool = False) -> TeacherTargets:
        cuda = self.device.type == "cuda"
        # Not on the side stream, where the step's own work beside it would count too; an
        # inline call (``__call__``, what the trainer makes) measures with one as well.
        measure = cuda and self._calls < self.measure_memory_steps and not on_side_stream
        if measure:
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        result = self._run(batch)
        if cuda:
            end.record()
            self._events = (start, end)  # read lazily in metrics(): no sync in the step
        else:
            self._last_ms = (time.perf_counter() - t0) * 1e3
        if measure:
            self._peak_bytes = torch.cuda.max_memory_allocated(self.device) - before
        self._calls += 1
        return result

    @property
    def memory_due(self) -> bool:
        """The next call measures the teachers' peak memory (CUDA, the first
        ``measure_memory_steps`` calls): make it inline (``__call__``), not ``submit``."""
        return self.device.type == "cuda" and self._calls < self.measure_memory_steps

    def __call__(self, batch) -> TeacherTargets:
        """Targets for ``batch`` (an ``olavlm.data.Batch``), on the current stream."""
        return self._measured(batch)

    def submit(self, batch) -> PendingTargets:
        """Start the teachers on the side stream (inline without one); ``.wait()`` later."""
        if self.side_stream is None:
            return PendingTargets(self._measured(batch), None)
        # The side stream must see everything the current stream did to the batch so far, and
        # the batch's device tensors must outlive the side stream's use of them.
        self.side_stream.wait_stream(torch.cuda.current_stream(self.device))
        for t in _device_tensors(batch):
            t.record_stream(self.side_stream)
        with torch.cuda.stream(self.side_stream):
            result = self._measured(batch, on_side_stream=True)
            done = torch.cuda.Event()
            done.record(self.side_stream)
        return PendingTargets(result, done, self.device)

    def metrics(self) -> dict[str, float | None]:
        """For the step's metrics: teacher weights (MiB), peak activation memory of a measured
        call (MiB, CUDA only), time of the last call (ms; CUDA events, read here)."""
        if self._events is not None:
            start, end = self._events
            end.synchronize()
            self._last_ms = start.elapsed_time(end)
        weights = sum(t.param_bytes() for t in self.teachers)
        peak = None if self._peak_bytes is None else self._peak_bytes / 2**20
        return {"teachers/weights_mib": weights / 2**20, "teachers/peak_mib": peak,
                "teachers/ms": self._last_ms}
