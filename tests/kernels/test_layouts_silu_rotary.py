# silu_mul and rotary_embedding with operands of different layouts (each read with its own strides).
"""The layout tests of test_silu_mul.py and test_rotary_embedding.py build both operands the same
way, so their strides are always equal and a kernel that reads one with the other's strides
passes them. Here they differ: gate and up with different row strides (one a contiguous
intermediate, the other half of a fused projection) in silu_mul's in-place backward, and a sin
table laid out unlike cos (a slice of a wider buffer, a position-major table).
"""
import pytest
import torch
from test_rotary_embedding import SHAPES, _check_against_oracle, _inputs

from olakernels import silu_mul
from olakernels.silu_mul import silu_mul_ref
from olakernels.testing import assert_close_to_reference

ROWS, N = 7, 40


def _gate_up(strided: str, dtype):
    """Leaves and (gate, up): non-leaf (ROWS, N) views whose row strides are N and 2N. The
    stride-N one is the first ROWS rows of a (2 ROWS, N) activation, the stride-2N one the second
    half of a (ROWS, 2N) projection: each buffer is as large as ROWS rows of the other's stride,
    so a kernel that swaps the strides writes wrong places but stays inside the memory."""
    g = torch.Generator().manual_seed(0)
    narrow = (torch.randn(2 * ROWS, N, generator=g) * 2).to(dtype).requires_grad_(True)
    wide = (torch.randn(ROWS, 2 * N, generator=g) * 2).to(dtype).requires_grad_(True)
    return (narrow, wide), _pick(strided, narrow * 1, wide * 1)


def _pick(strided, narrow, wide):
    """(gate, up) as views of the two buffers (or the same views of their gradients)."""
    a, b = narrow[:ROWS], wide[:, N:]
    return (b, a) if strided == "gate" else (a, b)


@pytest.mark.parametrize("strided", ["gate", "up"], ids=["gate_stride_2n", "up_stride_2n"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_silu_mul_inplace_backward_with_different_row_strides(strided, dtype):
    """inplace_backward writes grad_gate over gate and grad_up over up, each with its own row
    stride: swapping them puts rows of the gradients in the wrong places. The leaves' gradients
    must equal the out-of-place backward's (same math) and the float64 oracle's."""
    grad = torch.randn(ROWS, N, generator=torch.Generator().manual_seed(3)).to(dtype)
    results = []
    for inplace in (False, True):
        leaves, (gate, up) = _gate_up(strided, dtype)
        assert gate.stride(0) != up.stride(0)  # the premise
        silu_mul(gate, up, impl="triton", inplace_backward=inplace).backward(grad)
        results.append([t.grad for t in leaves])
    for want, got in zip(*results, strict=True):
        assert torch.equal(got, want)
    # The same gradients through the float64 oracle and through eager in the same dtype.
    _, (gate, up) = _gate_up(strided, dtype)
    g64, u64 = (t.detach().double().requires_grad_(True) for t in (gate, up))
    silu_mul_ref(g64, u64).backward(grad.double())
    ge, ue = (t.detach().clone().requires_grad_(True) for t in (gate, up))
    (torch.nn.functional.silu(ge) * ue).backward(grad)
    got_gate, got_up = _pick(strided, *results[1])
    assert_close_to_reference(got_gate, g64.grad, ge.grad, name="grad_gate")
    assert_close_to_reference(got_up, u64.grad, ue.grad, name="grad_up")


def _sin_unlike_cos(cos, sin, layout):
    """cos contiguous, sin the same values in another layout."""
    if layout == "sin_row_strided":  # a (B, L, D) slice of a (B, L, 2D) buffer
        wide = torch.zeros(*sin.shape[:-1], 2 * sin.shape[-1], dtype=sin.dtype)
        wide[..., : sin.shape[-1]] = sin
        return cos.contiguous(), wide[..., : sin.shape[-1]]
    # position-major: an (L, B, D) table seen as (B, L, D)
    return cos.contiguous(), sin.transpose(0, 1).contiguous().transpose(0, 1)


@pytest.mark.parametrize("layout", ["sin_row_strided", "sin_position_major"])
def test_rotary_cos_and_sin_in_different_layouts(layout):
    """cos and sin are separate tensors; a caller may build them differently (a slice of a
    cached table, a position-major one). Each must be read with its own strides, outputs and
    gradients within the budget of eager against the float64 oracle."""
    q, k, cos, sin = _inputs(SHAPES["ragged"], torch.float32, per_sample=True)
    cos, sin = _sin_unlike_cos(cos, sin, layout)
    assert cos.stride() != sin.stride() and cos.shape == sin.shape  # the premise
    _check_against_oracle("triton", q, k, cos, sin, label=layout)
