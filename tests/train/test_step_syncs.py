# Where the training step makes the host wait for the GPU: the reads the docs name, and nothing
# else (no read of a device tensor, no blocking copy of the host batch to the device).
"""A host sync stalls the CPU until the GPU has drained its queue (docs/model.md, "Host reads").
A non-logging optimizer step is allowed: per micro-batch the model's two documented reads (the
splice's length, transformers' causal-mask check), per step the trainer's one read of the
logged scalars and flags (docs/train.md, "A step"). Everything else the step reads must be
host data: the loader's batch and what is computed from it alone (the token counts).

On the CPU every tensor is a host tensor, so the test tells them apart itself: the loader's
batch tensors are marked "host", and the mark follows every op whose inputs are all host
tensors (or made from nothing, as ``torch.arange(t, device=batch.device)``); a move of a host
tensor to the training device (``.to(dev)``) gives an unmarked tensor, as on a GPU. A read of
an unmarked tensor is a device read; a ``.to(dev)`` of a host tensor that is not
``non_blocking`` is a blocking copy (CUDA: ``cudaStreamSynchronize`` after the copy), a sync
too. Input checks run as device-side asserts, as on a GPU; the model's own reads on its GPU
kernel paths are pinned by tests/models/test_host_syncs.py.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import traceback
import warnings

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary
from trainhelpers import demo_overrides

import olakernels._checks as checks
import olavlm.train.trainer as trainer_mod
from olakernels.testing import _custom_op_body, _host_sync_reason
from olavlm.config import resolve_config
from olavlm.train.trainer import Trainer

SPLICE = "olavlm/models/splice.py"
HF_MASK = "transformers/masking_utils.py"
# The CPU's LM head (impl="auto": the chunked torch path) compacts its rows with nonzero(); a
# GPU's Triton path does not (tests/models/test_host_syncs.py pins the model's kernel paths;
# the Triton interpreter would take minutes over the demo's steps here).
LCE_TORCH = "olakernels/linear_cross_entropy/impl/torch_chunked.py"
# torch's foreach AdamW (the CPU's; CUDA runs the fused one, whose step counters live on the
# device and are never read) reads its step counters, host tensors on any device.
OPTIM = "torch/optim/"


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("synthetic")


class _StepSyncs(TorchDispatchMode):
    """Device reads and blocking host-to-device copies, by step (see the module docstring)."""

    HOST, MADE = "host", "made"  # the loader's data / made from nothing (a factory op)

    def __init__(self, trainer):
        super().__init__()
        self.trainer = trainer
        self.kind = WeakIdKeyDictionary()  # tensor -> HOST | MADE; absent: a device tensor
        self.events: list[tuple[object, str, str]] = []  # (step or "log", why, stack)
        self.muted = 0
        self.in_log = False

    @contextlib.contextmanager
    def mute(self):
        self.muted += 1
        try:
            yield
        finally:
            self.muted -= 1

    def is_host(self, t) -> bool:
        return self.kind.get(t) == self.HOST

    def record(self, why: str) -> None:
        if not self.muted:
            step = "log" if self.in_log else self.trainer.step + 1
            self.events.append((step, why, "".join(traceback.format_stack()[:-2])))

    def _mark(self, inputs, out) -> None:
        kinds = {self.kind.get(t) for t in inputs}
        kind = self.MADE if not inputs or kinds == {self.MADE} else \
            self.HOST if kinds <= {self.HOST, self.MADE} else None
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                if kind is None:
                    self.kind.pop(t, None)  # (an in-place op's output is its input)
                else:
                    self.kind[t] = kind

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        reason = _host_sync_reason(func, args, kwargs)
        if reason is not None and not all(self.is_host(t) for t in inputs):
            self.record(reason)
            with self.mute():  # (the ops it runs inside are the same read)
                out = func(*args, **kwargs)
        else:
            body = _custom_op_body(func, args, kwargs)
            if body is not None:  # look inside olakernels' custom ops (their Python bodies)
                with self:
                    out = body(*args, **kwargs)
            else:
                out = func(*args, **kwargs)
        self._mark(inputs, out)
        return out


@contextlib.contextmanager
def _tracking(trainer, monkeypatch):
    mode = _StepSyncs(trainer)
    to, cpu = torch.Tensor.to, torch.Tensor.cpu
    tolist, numpy = torch.Tensor.tolist, torch.Tensor.numpy

    def moving(self, *args, **kwargs):
        device, _, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        out = to(self, *args, **kwargs)
        if device is None or not mode.is_host(self):
            return out
        if not non_blocking:
            mode.record("a blocking copy of a host tensor to the device")
        if out is self:  # (the same device on the CPU: a copy, as on a GPU)
            out = out.clone()
        mode.kind.pop(out, None)  # on the device from here on
        return out

    def to_host(self, *args, **kwargs):  # (.to("cpu") of a device tensor: not told apart)
        out = cpu(self, *args, **kwargs)
        if mode.is_host(self):
            return out
        mode.record("Tensor.cpu()")
        out = out.clone() if out is self else out  # (a host copy, as on a GPU)
        mode.kind[out] = mode.HOST
        return out

    def reading(name, method):
        def wrapper(self, *args, **kwargs):
            if not mode.is_host(self):
                mode.record(f"Tensor.{name}()")
            with mode.mute():  # (a CPU tensor's memory is read without an aten op)
                return method(self, *args, **kwargs)
        return wrapper

    real_batches = trainer_mod._skipping_empty

    def host_batches(trainer, loader):
        """The loader's batches, their tensors marked host (the loader's own work unseen)."""
        batches = real_batches(trainer, loader)
        while True:
            with mode.mute():
                batch = next(batches, None)
            if batch is None:
                return
            for field in dataclasses.fields(batch):
                for t in pytree.tree_leaves(getattr(batch, field.name)):
                    if isinstance(t, torch.Tensor):
                        mode.kind[t] = mode.HOST
            yield batch

    real_log = trainer._log

    def log(*args, **kwargs):  # (logging steps may read: docs/train.md "Metrics")
        mode.in_log = True
        try:
            return real_log(*args, **kwargs)
        finally:
            mode.in_log = False

    monkeypatch.setattr(checks, "_check_on_host", lambda t: False)  # device-side asserts
    monkeypatch.setattr(trainer_mod, "_skipping_empty", host_batches)
    monkeypatch.setattr(trainer, "_log", log)
    monkeypatch.setattr(torch.Tensor, "to", moving)
    monkeypatch.setattr(torch.Tensor, "cpu", to_host)
    monkeypatch.setattr(torch.Tensor, "tolist", reading("tolist", tolist))
    monkeypatch.setattr(torch.Tensor, "numpy", reading("numpy", numpy))
    with mode:
        yield mode


def _innermost(stack: str) -> str:
    """The deepest frame outside torch (the mode's own dispatch wrappers come last)."""
    frames = [x.strip() for x in stack.splitlines() if x.strip().startswith("File")]
    return [f for f in frames if "site-packages/torch/" not in f][-1]


def _where(events) -> list[str]:
    return [f"step {step}: {why} @ {_innermost(stack)}" for step, why, stack in events]


def _build(tmp_path, synth_dir, *extra) -> Trainer:
    cfg = resolve_config("demo", None, demo_overrides(
        tmp_path, synth_dir, "train.max_steps=3", "logging.every_steps=3", "data.batch_size=2",
        "optim.grad_accum=2", "checkpoint.every_steps=0", "checkpoint.at_end=false", *extra))
    return Trainer(cfg)


def _check_steps(mode, steps, group):
    """Each of ``steps`` (non-logging) made exactly the documented reads and nothing else."""
    for step in steps:
        events = [e for e in mode.events
                  if e[0] == step and OPTIM not in e[2] and LCE_TORCH not in e[2]]
        splice = [e for e in events if SPLICE in e[2]]
        mask = [e for e in events if HF_MASK in e[2] and SPLICE not in e[2]]
        rest = [e for e in events if SPLICE not in e[2] and HF_MASK not in e[2]]
        assert len(splice) == group and len(mask) <= group, _where(splice + mask)
        # the trainer's one read: the step's scalars, token count and flags
        assert len(rest) == 1 and "_train" in rest[0][2] and "tolist" in rest[0][1], \
            "host syncs beyond the documented ones:\n" + "\n".join(_where(rest))


def test_a_step_syncs_only_where_documented(tmp_path, synth_dir, monkeypatch):
    trainer = _build(tmp_path, synth_dir)
    try:
        with _tracking(trainer, monkeypatch) as mode:
            trainer.train()
    finally:
        trainer.close()
    assert trainer.step == 3
    _check_steps(mode, (1, 2), group=2)


def test_a_step_on_cached_targets_syncs_only_where_documented(tmp_path, synth_dir, monkeypatch):
    """teachers.mode=cache: the targets and their mask come with the batch (pinned by the
    loader on CUDA) and must reach the device without a blocking copy."""
    from olavlm.teachers import SyntheticTeacher, extract_targets
    from olavlm.train import build as B

    cfg = resolve_config("demo", None, demo_overrides(tmp_path, synth_dir))
    root = B.synthetic_dataset_dir(cfg, is_main=True, barrier=lambda: None)
    cache = tmp_path / "cache"
    extract_targets(root / "train.jsonl", cache, [SyntheticTeacher(**cfg.teachers.synthetic)],
                    num_workers=0)
    trainer = _build(tmp_path, synth_dir, "teachers.mode=cache", f"teachers.cache_dir={cache}")
    try:
        assert trainer.teachers is None
        with _tracking(trainer, monkeypatch) as mode:
            trainer.train()
    finally:
        trainer.close()
    _check_steps(mode, (1, 2), group=2)


def test_the_tracker_sees_a_device_read_and_a_blocking_copy(tmp_path, synth_dir, monkeypatch):
    """The tracker itself: a read of a model output and a blocking copy of the host batch are
    counted, a read of the host batch is not."""
    trainer = _build(tmp_path, synth_dir, "train.max_steps=1")
    real = trainer._micro_step

    def with_extra_syncs(batch, *args):
        int(batch.labels.sum())  # host data: no sync
        batch.input_ids.to(trainer.dist.device)  # blocking
        out = real(batch, *args)
        float(out.loss.detach())  # a device read
        out.token_accuracy.cpu()  # another
        return out

    trainer._micro_step = with_extra_syncs
    try:
        with _tracking(trainer, monkeypatch) as mode:
            trainer.train()
    finally:
        trainer.close()
    whys = [why for _, why, stack in mode.events if "with_extra_syncs" in _innermost(stack)]
    assert whys.count("a blocking copy of a host tensor to the device") == 2
    assert sum("_local_scalar_dense" in w for w in whys) == 2  # float(out.loss), per micro
    assert whys.count("Tensor.cpu()") == 2


@pytest.mark.gpu
def test_a_step_on_cuda_syncs_only_where_documented(tmp_path):
    """The same by CUDA's own account (``set_sync_debug_mode``), with the loader's pinned
    batches and the fused AdamW: after warm-up steps, the sync warnings of non-logging steps
    come from the splice, transformers' mask check and the trainer's one read a step only."""
    cfg = resolve_config("demo", None, [
        f"train.output_dir={tmp_path / 'runs'}", f"data.synthetic_dir={tmp_path / 'synth'}",
        "data.synthetic_num=32", "data.batch_size=4", "optim.grad_accum=2", "train.max_steps=6",
        "logging.every_steps=100", "train.device=cuda", "checkpoint.every_steps=0",
        "checkpoint.at_end=false", "logging.progress=false", "logging.plot=false"])
    trainer = Trainer(cfg)
    source = inspect.getsource(trainer_mod).splitlines()
    first = next(i for i, line in enumerate(source, 1) if "values = torch.cat([sums" in line)
    last = next(i for i, line in enumerate(source, 1) if "flags]).tolist()" in line)
    real_clip = trainer._clip

    def clip():  # watched: from step 3's clip to step 5's (the reads of steps 3 and 4)
        if trainer.step == 2:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
        elif trainer.step == 4:
            torch.cuda.set_sync_debug_mode("default")
        return real_clip()

    trainer._clip = clip
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.train()
    finally:
        torch.cuda.set_sync_debug_mode("default")
        trainer.close()
    # (a warning names the Python line that called the syncing op)
    seen = [(w.filename.replace("\\", "/"), w.lineno) for w in caught
            if "synchronizing CUDA operation" in str(w.message)]
    # Triton's autotuner benchmarks a shape it has not seen yet (once per shape): not the step's.
    seen = [s for s in seen if "/triton/" not in s[0]]
    ours = [s for s in seen if s[0].endswith("olavlm/train/trainer.py")]
    other = [s for s in seen if not s[0].endswith(("olavlm/train/trainer.py", SPLICE,
                                                   HF_MASK))]
    assert not other, other
    # steps 3 and 4's one read each; nothing else of the trainer's (the micro-batches of steps
    # 4 and 5 are watched too)
    assert len(ours) == 2 and all(first <= n <= last for _, n in ours), (ours, first, last)
