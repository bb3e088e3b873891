# OlaVLM's training forward against spec_reference.py, an oracle written from SPEC.md alone.
"""The engine (tiny real decoders, impl="torch", built in fp32 then ``.double()``) and the
independent float64 reference must give the same loss, the same logged components and the same
gradients, case by case: padding sides, text-only rows, layer lists, aux_mode subsets and
orders, pass_text_to_aux, truncation, loss weights, Qwen2 / Phi-3 decoders and seed_compat.

Tolerances. Both sides compute in float64 from the same weights, so they differ only by
summation order (other kernels and op splits); there is no lower-precision eager run to scale
by, so assert_close_to_reference's rule does not apply. Measured over these cases: loss <= 1.1e-12
relative, gradients <= 2.5e-10 (norm of the difference over the reference's norm). A modelling
error (a wrong layer, weight or mask) moves them by 1e-4 or more. Hence:
- loss: 1e-9 relative;
- logged components: the engine stores them as fp32 (OlaOutput.components), one rounding of a
  float64 value (<= 2^-24 ~ 6e-8 relative): 3e-7 relative (a few fp32 ulps);
- gradients: ||engine - reference|| <= 1e-8 ||reference|| (+1e-14 for exactly zero ones, e.g. a
  logit scale held by its clamp).
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from spec_reference import clip_patch_features, spec_forward
from tiny_ola import tiny_batch, tiny_heads, tiny_model

F64 = torch.float64
LOSS_RTOL = 1e-9
COMPONENT_RTOL = 3e-7
GRAD_RTOL = 1e-8
GRAD_ATOL = 1e-14
PAD_FROM = [None, 18, 20, 15]  # three rows padded, at different lengths


@dataclasses.dataclass
class Case:
    model: dict = dataclasses.field(default_factory=dict)  # ModelConfig overrides
    batch: dict = dataclasses.field(default_factory=dict)  # tiny_batch arguments
    kind: str = "llama"  # the decoder
    left_pad: bool = False  # move each row's padding to its left
    logit_scales: dict | None = None  # {task: value} set after building
    target_mask: tuple | None = None  # overrides the image mask in the embedding losses
    grads: bool = False  # also compare gradients of GRAD_PARAMS


def _heads(**changes) -> dict:
    heads = tiny_heads()
    for task, fields in changes.items():
        heads[task] = dataclasses.replace(heads[task], **fields)
    return heads


SEED_COMPAT = dict(seed_compat=True, num_sys_tokens=4)
CASES = {
    "right_pad": Case(batch=dict(pad_from=PAD_FROM), grads=True),
    "left_pad_text_only": Case(batch=dict(pad_from=PAD_FROM, text_only=(3,)), left_pad=True,
                               grads=True),
    "text_only_rows": Case(batch=dict(pad_from=PAD_FROM, text_only=(0, 2)), grads=True),
    "all_text_only": Case(batch=dict(text_only=(0, 1, 2, 3))),
    # seg missing from the string: its one head reads the final normed state; gen's layer 4
    # (the last block) is that state too; the order within a task is kept (4 then 1).
    "layers_missing_task": Case(model=dict(layer_indices="d1-3_g4-1"), grads=True),
    "aux_depth": Case(model=dict(aux_mode="depth", layer_indices="d2-4")),
    "aux_gen_seg": Case(model=dict(aux_mode="gen-seg", layer_indices="s1-3_g2-3"),
                        batch=dict(pad_from=PAD_FROM)),
    "aux_seg_depth_gen": Case(model=dict(aux_mode="seg-depth-gen"), grads=True),
    "text_not_to_aux": Case(model=dict(pass_text_to_aux=False), batch=dict(pad_from=PAD_FROM)),
    # 16 image + 12 task tokens + ~20 text: rows are cut inside their text
    "max_length": Case(model=dict(max_length=40), batch=dict(pad_from=PAD_FROM)),
    "weights_and_beta": Case(model=dict(loss_weights="d0.25_s1.0_g0.75", contrastive_weight=0.7,
                                        smooth_l1_beta=0.3), grads=True),
    # exp(5) > 100: gen's scale is clamped (no gradient); the others are not
    "logit_scales": Case(logit_scales={"gen": 5.0, "depth": -1.0, "seg": 4.0}, grads=True),
    "target_mask": Case(target_mask=(1, 0, 1, 1)),
    # 2 task tokens: gen's 8 queries repeat them, depth/seg average 8 parameter rows each
    "head_variants": Case(model=dict(num_task_tokens=2, heads=_heads(
        gen=dict(num_queries=8, target_shape=(8, 16)), depth=dict(depth=2, ff_mult=2, heads=2),
        seg=dict(depth=2, dim_head=4, heads=3)))),
    "qwen2": Case(kind="qwen2", batch=dict(pad_from=PAD_FROM, text_only=(2,)), grads=True),
    "phi3": Case(kind="phi3", batch=dict(pad_from=PAD_FROM, text_only=(2,)), grads=True),
    "seed_compat": Case(model=SEED_COMPAT, grads=True, batch=dict(
        placeholders=[4] * 4, pad_from=PAD_FROM, text_only=(2,))),
}


def grad_params(tasks) -> list[str]:
    """The projector, each task's tokens, a head weight and the logit scale."""
    names = ["mm_projector.0.weight", "mm_projector.2.bias"]
    for task in tasks:
        names += [f"task_tokens.special_{task}_tokens", f"{task}_logit_scale",
                  f"image_{task}_heads.0.projector.layers.0.0.to_kv.weight"]
    if "depth" in tasks:
        names.append("image_depth_heads.0.linear_1.0.weight")
    return names


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These tensors are tiny: with a second thread the ~10k small float64 ops wait on each
    other (38-84 s for this file on the 2 shared CI cores, 6 s with one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("spec_reference")


@pytest.fixture(scope="module")
def build(tmp):
    """A cached builder: cases that share a configuration share the model."""
    cache = {}

    def get(case: Case):
        key = repr((case.kind, case.model, case.logit_scales))
        if key not in cache:
            model = tiny_model(tmp, kind=case.kind, impl="torch", **case.model).double().train()
            with torch.no_grad():
                for task, value in (case.logit_scales or {}).items():
                    getattr(model, f"{task}_logit_scale").fill_(value)
            cache[key] = model
        return cache[key]

    return get


def _left_padded(batch):
    ids, mask, labels, *rest = batch
    shifts = [int(s) for s in (~mask).sum(1)]

    def roll(t):
        return torch.stack([torch.roll(row, s) for row, s in zip(t, shifts, strict=True)])

    return (roll(ids), roll(mask), roll(labels), *rest)


def _engine(model, batch, target_mask, grads: bool):
    ids, mask, labels, images, image_mask, targets = batch
    model.zero_grad(set_to_none=True)
    out = model(ids, mask, labels, images, image_mask, targets=targets, target_mask=target_mask)
    if grads:
        out.loss.backward()
    return out


def _reference(model, batch, tower_dir, target_mask, grad_names):
    ids, mask, labels, images, image_mask, targets = batch
    weights = model.state_dict()
    for name in grad_names:
        weights[name] = weights[name].clone().requires_grad_(True)
    llm_config = json.loads((Path(model.config.llm) / "config.json").read_text())
    features = clip_patch_features(tower_dir, images, model.config.vision_select_layer)
    loss_mask = image_mask if target_mask is None else target_mask
    loss, scalars = spec_forward(weights, model.config, llm_config, features, ids, mask, labels,
                                 loss_mask, targets)
    if grad_names:
        loss.backward()
    return loss, scalars, {name: weights[name].grad for name in grad_names}


@pytest.mark.parametrize("name", list(CASES))
def test_engine_equals_the_spec_reference(build, tmp, name):
    case = CASES[name]
    model = build(case)
    batch = tiny_batch(model, dtype=F64, **case.batch)
    if case.left_pad:
        batch = _left_padded(batch)
        assert not batch[1][:, 0].all()  # some row does start with padding
    target_mask = None if case.target_mask is None else torch.tensor(case.target_mask)
    grad_names = grad_params(model.tasks) if case.grads else []

    out = _engine(model, batch, target_mask, case.grads)
    ref_loss, ref, ref_grads = _reference(model, batch, tmp / "clip" / "tiny-clip", target_mask,
                                          grad_names)

    assert out.loss.dtype == F64
    assert math.isclose(out.loss.item(), ref_loss.item(), rel_tol=LOSS_RTOL), \
        f"loss: engine {out.loss.item()!r}, reference {ref_loss.item()!r}"
    logged = out.scalars()
    assert int(logged.pop("num_valid_tokens")) == ref.pop("num_valid_tokens")
    assert set(out.components) == set(ref), "the engine logs other components"
    for key, value in ref.items():
        assert math.isclose(logged[key], value.item(), rel_tol=COMPONENT_RTOL, abs_tol=1e-12), \
            f"{key}: engine {logged[key]!r}, reference {value.item()!r}"
    for pname, want in ref_grads.items():
        got = model.get_parameter(pname).grad
        assert got is not None, f"{pname}: the engine gives no gradient"
        err = float((got - want).norm())
        assert err <= GRAD_RTOL * float(want.norm()) + GRAD_ATOL, \
            f"grad {pname}: |diff| {err:.3g}, |reference| {float(want.norm()):.3g}"
