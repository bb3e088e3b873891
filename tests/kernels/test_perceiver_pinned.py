# Pins of the perceiver fast path's documented structure, and the gradient that reaches the LLM.
"""docs/ops/perceiver.md promises three things no other test checked:

- shared queries (task-token parameters, learned latents) go through proj_in, norm2 and the
  q/k/v projections once (leading size 1), then broadcast;
- keys/values never make a (B, N + M, dim) hidden-state copy (only projected rows are joined);
- the gradient with respect to the inputs x (what flows back into the LLM) is the seed's.

The structural checks record aten ops (and olakernels' custom ops) with a TorchDispatchMode,
so they hold whatever Python route the fast path takes to its GEMMs.
"""
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from olakernels.perceiver import PerceiverResampler, TaskTokenResampler
from olakernels.testing import assert_close_to_reference

B, N, E = 3, 20, 96


def _seg(impl: str) -> TaskTokenResampler:
    """The seg head scaled down: 36 shared queries, dim 48 (2 x heads x dim_head = 64)."""
    torch.manual_seed(0)
    return TaskTokenResampler(dim=48, num_queries=36, output_dim=48, depth=1, dim_head=8,
                              heads=4, embedding_dim=E, ff_mult=1, impl=impl)


def _ragged(impl: str, learned: bool = True):
    """Odd sizes everywhere, two blocks; learned latents or task-token latents."""
    torch.manual_seed(0)
    cls = PerceiverResampler if learned else TaskTokenResampler
    return cls(dim=40, depth=2, dim_head=7, heads=3, num_queries=5, embedding_dim=29,
               output_dim=11, ff_mult=2, impl=impl)


def _storage(t) -> int | None:
    if isinstance(t, torch.Tensor) and t.device.type != "meta":
        return t.untyped_storage().data_ptr()
    return None


class _Ops(TorchDispatchMode):
    """Every op's name, tensor argument shapes and storages, and output shapes."""

    def __init__(self):
        super().__init__()
        self.calls = []  # (name, [(storage, shape) of tensor args], [output shapes])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = [(_storage(a), tuple(a.shape)) for a in tree_flatten((args, kwargs))[0]
               if isinstance(a, torch.Tensor)]
        outs = [tuple(t.shape) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        self.calls.append((str(func), ins, outs))
        return out

    def rows_of_inputs_with(self, param: torch.Tensor) -> list[int]:
        """For each op taking ``param``: the rows (numel / last dim) of its largest other tensor
        argument -- the activations the parameter is applied to."""
        key, rows = _storage(param), []
        for _, ins, _ in self.calls:
            if key not in [s for s, _ in ins]:
                continue
            others = [shape for s, shape in ins if s != key and len(shape) >= 1]
            if not others:
                continue
            shape = max(others, key=lambda s: torch.Size(s).numel())
            rows.append(torch.Size(shape).numel() // max(shape[-1], 1))
        return rows


def _record(module, *args, backward=False):
    with _Ops() as ops:
        out = module(*args)
        if backward:
            out.sum().backward()
    return ops


@pytest.mark.parametrize("impl", ["auto", "torch", "triton"])
@pytest.mark.parametrize("latents_shape", [(36, E), (1, 36, E)], ids=["2d", "3d"])
def test_shared_task_token_queries_are_projected_once(impl, latents_shape):
    """The depth/seg heads' task-token parameter: proj_in, norm2, to_q and to_kv see its M rows
    once, not B x M (the seed repeats them per sample: a 4096 x 4096 GEMM B times)."""
    head = _seg(impl)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, N, E, generator=g)
    latents = torch.randn(latents_shape, generator=g)
    m = head.num_queries
    ops = _record(head, x, latents)
    attn = head.layers[0][0]
    assert set(ops.rows_of_inputs_with(head.proj_in.weight)) == {B * N, m}
    assert ops.rows_of_inputs_with(attn.norm2.weight) == [m]
    assert ops.rows_of_inputs_with(attn.to_q.weight) == [m]
    assert sorted(ops.rows_of_inputs_with(attn.to_kv.weight)) == sorted([B * N, m])
    # Non-vacuous: the seed's math repeats the queries, and the recorder sees it.
    head.impl = "reference"
    ref_ops = _record(head, x, latents)
    assert ref_ops.rows_of_inputs_with(attn.to_q.weight) == [B * m]


@pytest.mark.parametrize("impl", ["auto", "torch"])
def test_learned_latents_are_normed_and_projected_once(impl):
    """Learned latents (1, M, dim): the first block's norm2 and to_q run on M rows; the second
    block's queries differ per sample after the first residual, so they run on B x M."""
    head = _ragged(impl)
    x = torch.randn(B, N, 29, generator=torch.Generator().manual_seed(1))
    ops = _record(head, x)
    m = head.num_queries
    first, second = head.layers[0][0], head.layers[1][0]
    assert ops.rows_of_inputs_with(first.norm2.weight) == [m]
    assert ops.rows_of_inputs_with(first.to_q.weight) == [m]
    assert ops.rows_of_inputs_with(second.to_q.weight) == [B * m]


def _kv_copy_shape(head, x):
    return (x.shape[0], x.shape[1] + head.num_queries, head.dim)


@pytest.mark.parametrize("impl", ["auto", "torch", "triton"])
@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "mask"])
@pytest.mark.parametrize("kind", ["seg_shared", "seg_per_sample", "ragged_learned"])
def test_keys_values_never_concatenate_hidden_states(impl, masked, kind):
    """No (B, N + M, dim) tensor in the forward or the backward: the inputs and the latents are
    projected separately and only (.., N + M, 2 x heads x dim_head) rows are joined."""
    if kind == "ragged_learned":
        head, emb, latents = _ragged(impl), 29, None
        assert 2 * head.layers[0][0].heads * head.layers[0][0].dim_head != head.dim
    else:
        head, emb = _seg(impl), E
        lat_shape = (36, E) if kind == "seg_shared" else (B, 36, E)
        latents = torch.randn(lat_shape, generator=torch.Generator().manual_seed(3))
    x = torch.randn(B, N, emb, generator=torch.Generator().manual_seed(2), requires_grad=True)
    mask = None
    if masked:
        mask = torch.ones(B, N, dtype=torch.bool)
        mask[1, 13:] = False
    args = (x,) if latents is None else (x, latents)
    args = args + ((mask,) if masked else ())
    copy_shape = _kv_copy_shape(head, x)
    ops = _record(head, *args, backward=True)
    made = [(name, outs) for name, _, outs in ops.calls if copy_shape in outs]
    assert not made, f"a (B, N + M, dim) = {copy_shape} tensor was made by {made[:3]}"
    # Non-vacuous: the seed's concatenation of the normed hidden states is seen.
    head.impl = "reference"
    ref = _record(head, *args, backward=True)
    assert any(copy_shape in outs for _, _, outs in ref.calls)


# ---- the gradient with respect to x, the LLM's hidden states ----


def _mask(batch: int, tokens: int) -> torch.Tensor:
    mask = torch.ones(batch, tokens, dtype=torch.bool)
    mask[0, tokens - 5:] = False  # padding at the end of two samples
    mask[2, 9:] = False
    return mask


def _grad_x(module, impl, x, latents, mask, dtype):
    module = copy.deepcopy(module).to(dtype)
    module.impl = impl
    xx = x.detach().to(dtype).requires_grad_(True)
    args = (xx,) if latents is None else (xx, latents.to(dtype))
    out = module(*args, attend_mask=mask)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    (out * w.to(dtype)).sum().backward()
    return xx.grad


def _ragged_case(kind):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 17, 29, generator=g)
    if kind == "learned":
        return _ragged("reference"), x, None
    if kind == "shared":  # 3 task tokens tiled to 6 queries (adapt_latents), shared
        torch.manual_seed(0)
        head = TaskTokenResampler(dim=40, depth=2, dim_head=7, heads=3, num_queries=6,
                                  embedding_dim=29, output_dim=11, ff_mult=2)
        return head, x, torch.randn(3, 29, generator=g)
    torch.manual_seed(0)  # per-sample latents, one query: "auto" runs the seed's math
    head = TaskTokenResampler(dim=40, depth=1, dim_head=7, heads=3, num_queries=1,
                              embedding_dim=29, output_dim=11, ff_mult=2)
    return head, x, torch.randn(4, 5, 29, generator=g)


KINDS = ["learned", "shared", "per_sample"]


@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "mask"])
@pytest.mark.parametrize("kind", KINDS)
def test_reference_grad_x_is_the_derivative(kind, masked):
    """The float64 oracle's own gradient with respect to x, checked by finite differences
    (so the comparisons below do not rest on autograd of the same code)."""
    head, x, latents = _ragged_case(kind)
    head = copy.deepcopy(head).double()
    head.impl = "reference"
    x = x[:, :9].double().requires_grad_(True)  # (small: gradcheck evaluates per element)
    mask = _mask(4, 17)[:, :9] if masked else None
    lat = None if latents is None else latents.double()
    fn = (lambda xx: head(xx, attend_mask=mask)) if lat is None else \
        (lambda xx: head(xx, lat, attend_mask=mask))
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "mask"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("impl", ["auto", "torch", "reference"])
@pytest.mark.parametrize("kind", KINDS)
def test_grad_x_matches_the_float64_reference(kind, impl, dtype, masked):
    """grad_x of each impl against the float64 reference: within k x eager's error (the seed's
    math in the same dtype) plus the rounding floor; the reference itself within the floor
    alone in fp32. Padding positions get exactly no gradient."""
    head, x, latents = _ragged_case(kind)
    mask = _mask(4, 17) if masked else None
    ref = _grad_x(head, "reference", x, latents, mask, torch.float64)
    got = _grad_x(head, impl, x, latents, mask, dtype)
    assert got.dtype == dtype
    # grad_x = proj_in.weight.T @ (gradient of proj_in's output): sums of dim terms each.
    reduction = head.dim
    if impl == "reference":
        if dtype == torch.float32:
            assert_close_to_reference(got, ref, None, name=f"{kind}.reference.grad_x",
                                      floor_ulps=16, reduction_size=reduction)
    else:
        eager = _grad_x(head, "reference", x, latents, mask, dtype)
        assert_close_to_reference(got, ref, eager, name=f"{kind}.{impl}.grad_x", k=3.0,
                                  reduction_size=reduction)
    if masked:
        assert torch.count_nonzero(got[~mask]) == 0, "padding got a gradient"
        assert torch.count_nonzero(ref[~mask]) == 0
