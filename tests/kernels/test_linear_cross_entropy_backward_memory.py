# What linear_cross_entropy's backward allocates, per schedule: only the gradients it returns.
"""The gradients-in-forward schedules (BLAS, grad_in_forward) return their fp32 unit gradients
as extra outputs of a custom op. Unless told otherwise, autograd hands a backward a zero tensor
for every output that got no gradient, so each backward allocated an fp32 (V, H) of zeros next
to the unit grad_weight: 2.1 GB for Llama-3's head, the gap between run 7's measured peak and
the count in docs/PERF.md. The backward here must allocate the returned gradients, one scaled
copy of the compacted grad_hidden rows, and nothing of the unit gradients' size.
"""
import pytest
import torch

from olakernels import linear_cross_entropy
from olakernels.linear_cross_entropy.impl import triton as triton_impl
from olakernels.testing import make_lm_head_inputs, track_peak_memory

N, H, V = 96, 32, 256
SLACK = 4096  # scalars (the upstream scale, the loss's ones)


def _backward_peak(dtype, device, ignored=0.0):
    hidden, weight, labels, _ = make_lm_head_inputs((N,), H, V, dtype=dtype, device=device,
                                                    ignored=ignored)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    loss = linear_cross_entropy(hidden, weight, labels, impl="triton")
    with track_peak_memory() as mem:
        loss.backward()
    size = dtype.itemsize
    # grad_hidden (N, H) + the scaled compacted rows (<= N, H) + grad_weight (V, H)
    returned = N * H * size * 2 + V * H * size
    return mem.peak, returned


@pytest.mark.parametrize("schedule", ["blas", "grad_in_forward"])
def test_backward_allocates_no_zero_gradients(schedule, device, monkeypatch):
    knob = {"blas": "always"} if schedule == "blas" else {"grad_in_forward": True}
    monkeypatch.setattr(triton_impl, "BLOCKS_OVERRIDE", knob)
    dtype = torch.bfloat16 if schedule == "blas" else torch.float32
    peak, returned = _backward_peak(dtype, device)
    unit_weight = V * H * 4  # what a materialized zero grad_weight would add
    assert peak <= returned + SLACK, (
        f"{schedule}: backward peak {peak} B, the returned gradients {returned} B "
        f"(a zero fp32 grad_weight would be {unit_weight} B more)")


def test_kernel_backward_allocates_no_zeros_for_the_side_outputs(device, monkeypatch):
    """The kernel path's side outputs (correct, lse, order, count) get no zero gradients: the
    backward's own buffers only."""
    monkeypatch.setattr(triton_impl, "BLOCKS_OVERRIDE", {})
    hidden, weight, labels, _ = make_lm_head_inputs((N,), H, V, device=device)
    hidden.requires_grad_(True)
    loss = linear_cross_entropy(hidden, weight, labels, impl="triton")
    seen = []

    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    with Record():
        loss.backward()
    zero_fills = [f for f in seen if f in (torch.ops.aten.zeros.default,
                                           torch.ops.aten.zeros_like.default)]
    assert not zero_fills, f"backward materialized zero gradients: {zero_fills}"
