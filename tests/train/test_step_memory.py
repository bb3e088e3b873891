# Memory held across training steps: nothing a micro-step made lives into the next forward, and
# the step copies each host tensor to the device once, dropping its copies before the backward.
from __future__ import annotations

import collections
import contextlib
import dataclasses
import gc
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from trainhelpers import demo_overrides

from olavlm.config import resolve_config
from olavlm.train.trainer import Trainer


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("synthetic")


def _trainer(tmp_path, synth_dir, *extra) -> Trainer:
    return Trainer(resolve_config("demo", None, demo_overrides(
        tmp_path, synth_dir, "train.max_steps=2", "optim.grad_accum=2", "data.batch_size=2",
        "checkpoint.every_steps=0", "checkpoint.at_end=false", *extra)))


class _Made(TorchDispatchMode):
    """The storages every op creates inside the mode, while they are alive (no gc: a storage
    kept by a reference cycle counts as alive, as it is on a GPU until a collection runs)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, str] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key == 0 or key in inputs or key in self.live:  # a view, an in-place op
                continue
            self.live[key] = f"{func} -> {tuple(t.shape)}"
            weakref.finalize(storage, self.live.pop, key, None)
        return out


@contextlib.contextmanager
def _device_copies():
    """On the CPU ``t.to(device)`` returns ``t`` itself: here it returns a copy (what a GPU's
    host-to-device copy makes), counted per source tensor."""
    real = torch.Tensor.to
    copies: collections.Counter = collections.Counter()

    def to(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        moves = "device" in kwargs or any(isinstance(a, (torch.device, str)) for a in args)
        if out is self and moves and not isinstance(self, torch.nn.Parameter):
            copies[id(self)] += 1
            out = self.clone()
        return out

    torch.Tensor.to = to
    try:
        yield copies
    finally:
        torch.Tensor.to = real


def test_nothing_a_micro_step_made_lives_into_the_next_forward(tmp_path, synth_dir):
    """Every tensor a micro-step creates (its device batch, teacher targets, activations, tapped
    hidden states, head predictions, loss and output) is freed when the next micro-step's
    forward starts, without a garbage collection; only the accumulated gradients stay within
    a step. Otherwise the peak holds two micro-steps' tensors (an H100 OOM). The first step's
    loss is NaN (a skipped step) and a checkpoint follows it: neither keeps anything either."""
    trainer = _trainer(tmp_path, synth_dir, "checkpoint.every_steps=1")
    forward = trainer.model.forward

    def nan_in_the_first_step(*args, **kwargs):
        out = forward(*args, **kwargs)
        if trainer.step == 0:
            out.loss = out.loss * float("nan")
        return out

    trainer.model.forward = nan_in_the_first_step
    made: list[_Made] = []
    leaks: list[str] = []
    forwards = 0
    real_micro_step = trainer._micro_step

    def micro_step(*args, **kwargs):
        mode = _Made()
        made.append(mode)
        with mode:
            return real_micro_step(*args, **kwargs)

    def check(_module, _args, _kwargs):
        nonlocal forwards
        forwards += 1
        grads = {p.grad.untyped_storage().data_ptr() for p in trainer.model.parameters()
                 if p.grad is not None}
        for i, mode in enumerate(made[:-1]):  # (the last is the micro-step now starting)
            alive = [what for key, what in mode.live.items() if key not in grads]
            if alive:
                leaks.append(f"forward {forwards}: micro-step {i}'s {alive}")

    trainer._micro_step = micro_step
    hook = trainer.model.register_forward_pre_hook(check, with_kwargs=True)
    enabled = gc.isenabled()
    gc.disable()
    try:
        with _device_copies():
            trainer.train()
        for i, mode in enumerate(made):  # and after the run
            if mode.live:
                leaks.append(f"after train(): micro-step {i}'s {list(mode.live.values())}")
    finally:
        if enabled:
            gc.enable()
        hook.remove()
        trainer.close()
    assert forwards == 4 and trainer.nonfinite_total == 1
    assert trainer.checkpointer.latest() is not None
    assert not leaks, "\n".join(leaks[:5])


def _one_batch(trainer):
    batch = next(iter(trainer.loader))
    assert len(batch) and batch.maps, "the demo's synthetic teacher reads the batch's maps"
    return batch


def test_the_step_copies_each_host_tensor_to_the_device_once(tmp_path, synth_dir):
    """The model's inputs reach the device once; the teachers' inputs (maps, raw images, views)
    only through the teachers, which move their own; cached targets once. The device batch
    used to copy all of them (again), and hold the copies through the forward and backward."""
    trainer = _trainer(tmp_path, synth_dir)
    try:
        batch = _one_batch(trainer)
        ntp_tokens, counts = trainer._step_ntp_tokens([batch])
        teacher_inputs = [t for v in batch.maps.values() for t in v]
        model_inputs = [batch.input_ids, batch.attention_mask, batch.labels, batch.images]
        with _device_copies() as copies:
            trainer._micro_step(batch, 1, ntp_tokens, counts[0])
        assert [copies[id(t)] for t in model_inputs] == [1] * 4
        assert [copies[id(t)] for t in teacher_inputs] == [1] * len(teacher_inputs)

        # Cache mode: the same targets, read from the batch (no teachers in the step).
        targets = trainer.teachers(batch).targets
        cached = dataclasses.replace(batch, maps=None, targets={
            k: v.clone() for k, v in targets.items()}, target_mask=batch.image_mask.clone())
        trainer.teachers, online = None, trainer.teachers
        try:
            with _device_copies() as copies:
                trainer._micro_step(cached, 1, ntp_tokens, counts[0])
        finally:
            trainer.teachers = online
        assert {k: copies[id(v)] for k, v in cached.targets.items()} == \
            dict.fromkeys(cached.targets, 1)
        assert [copies[id(t)] for t in model_inputs] == [1] * 4
    finally:
        trainer.close()


def test_the_backward_runs_without_the_steps_own_device_copies(tmp_path, synth_dir):
    """When the backward starts, the micro-step holds none of its device copies or targets
    beyond what autograd saved: the teacher's seg map, say, is freed once the forward made
    the head's layout from it (which autograd saves), not after the backward."""
    trainer = _trainer(tmp_path, synth_dir)
    refs: dict[str, tuple[weakref.ref, int]] = {}
    saved: set[int] = set()
    held: list[str] = []

    def keep_refs(_module, args, _kwargs, out):
        names = ("input_ids", "attention_mask", "labels", "images", "image_mask")
        tensors = dict(zip(names, args, strict=False))
        tensors.update({f"target {task}": args[5][task] for task in trainer.model.tasks})
        refs.update({name: (weakref.ref(t), t.untyped_storage().data_ptr())
                     for name, t in tensors.items()})

        def at_backward(grad):  # (the loss's gradient: the first thing the backward computes)
            held.extend(name for name, (ref, key) in refs.items()
                        if ref() is not None and key not in saved)
            return grad

        out.loss.register_hook(at_backward)

    def pack(t):
        saved.add(t.untyped_storage().data_ptr())
        return t

    hook = trainer.model.register_forward_hook(keep_refs, with_kwargs=True)
    enabled = gc.isenabled()
    gc.disable()
    try:
        batch = _one_batch(trainer)
        ntp_tokens, counts = trainer._step_ntp_tokens([batch])
        with _device_copies(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            trainer._micro_step(batch, 1, ntp_tokens, counts[0])
    finally:
        if enabled:
            gc.enable()
        hook.remove()
        trainer.close()
    assert "target seg" in refs and "images" in refs
    assert not held, f"alive through the backward, not saved by autograd: {held}"


def test_tapped_hidden_states_die_with_the_graph_and_inference_keeps_none(tmp_path, synth_dir):
    """The layer taps' states (and the decoder's final state) are held by autograd alone: once
    the backward ran they are freed, though the step's output is still referenced; the
    taps keep nothing after a forward, ``visual_interpretations`` or ``generate``."""
    trainer = _trainer(tmp_path, synth_dir)
    model = trainer.model
    states: list[tuple[str, weakref.ref]] = []
    hooks = [model.parts.layers[k - 1].register_forward_hook(
        lambda _m, _a, o, k=k: states.append((f"block {k}", weakref.ref(
            o[0] if isinstance(o, tuple) else o)))) for k in model._taps.layers]
    hooks.append(model.parts.decoder.register_forward_hook(
        lambda _m, _a, o: states.append(("final", weakref.ref(o.last_hidden_state)))))
    enabled = gc.isenabled()
    gc.disable()
    try:
        batch = _one_batch(trainer)
        ntp_tokens, counts = trainer._step_ntp_tokens([batch])
        out = trainer._micro_step(batch, 1, ntp_tokens, counts[0])
        assert out.loss.grad_fn is not None and len(states) == len(model._taps.layers) + 1
        alive = [name for name, ref in states if ref() is not None]
        assert not alive, f"alive after the backward: {alive}"
        assert not model._taps.states and not model._taps.wanted

        model.eval()
        states.clear()
        preds = model.visual_interpretations(batch.input_ids, batch.attention_mask,
                                             batch.images)
        assert set(preds) == set(model.tasks)
        assert not model._taps.states and not model._taps.wanted
        assert [name for name, ref in states if ref() is not None] == []
        model.generate(batch.input_ids[:1, :8], batch.attention_mask[:1, :8],
                       batch.images[:1], max_new_tokens=2, do_sample=False)
        assert not model._taps.states and not model._taps.wanted
    finally:
        if enabled:
            gc.enable()
        for h in hooks:
            h.remove()
        trainer.close()
