# linear_cross_entropy with hidden.requires_grad=False: no grad_hidden work on any Triton schedule.
"""Issue 3: "hidden without grad skips dX". Every schedule of the Triton path is checked: the
backward's need flag, and no launch of the kernels (or BLAS GEMM) that compute grad_hidden,
while grad_weight and grad_bias still match the float64 reference. Each case also runs with a
trainable hidden state, so the spies are shown to see that work when it is due.
"""
import pytest
import torch
from test_linear_cross_entropy import _check

from olakernels.linear_cross_entropy import api
from olakernels.linear_cross_entropy.impl import (
    blas_fused_grad,
    triton_fused_grad,
    triton_vocab_slabs,
)
from olakernels.linear_cross_entropy.impl import triton as triton_impl
from olakernels.testing import make_lm_head_inputs

H, V = 23, 101


class _Spies:
    def __init__(self):
        self.need = []  # (schedule, need_hidden, need_weight, need_bias)
        self.launches = {"_lce_dhidden_kernel": 0, "_lce_dhidden_slab_kernel": 0,
                         "blas_gemm": 0}  # the last: grad_h = dlogits @ weight in BLAS


class _Launches:
    def __init__(self, kernel, name, spies):
        self.kernel, self.name, self.spies = kernel, name, spies

    def __getitem__(self, grid):
        self.spies.launches[self.name] += 1
        return self.kernel[grid]


@pytest.fixture
def spies(monkeypatch):
    s = _Spies()

    def need_spy(module, name, schedule, first):
        real = getattr(module, name)

        def spy(*args):
            s.need.append((schedule, *args[first:first + 3]))
            return real(*args)
        monkeypatch.setattr(module, name, spy)

    need_spy(triton_impl, "lce_backward", "backward", 11)
    need_spy(triton_fused_grad, "lce_forward_with_grads", "grad_in_forward", 8)
    need_spy(blas_fused_grad, "lce_forward_with_grads_blas", "blas", 8)
    for module, name in ((triton_impl, "_lce_dhidden_kernel"),
                         (triton_vocab_slabs, "_lce_dhidden_slab_kernel")):
        monkeypatch.setattr(module, name, _Launches(getattr(module, name), name, s))
    gemm = blas_fused_grad.gemm_fp32_out

    def gemm_spy(out, a, b, accumulate):
        # grad_hidden rows = dlogits @ weight (b: the weight); grad_weight = dlogits.T @ rows.
        s.launches["blas_gemm"] += b.shape[0] == V and out.shape[1] == H
        return gemm(out, a, b, accumulate)
    monkeypatch.setattr(blas_fused_grad, "gemm_fp32_out", gemm_spy)
    return s


# name -> (tokens, dtype, tile knobs, extra options, the schedule that must run, the grad_hidden
# work it does when hidden trains)
CASES = {
    "vocab_slabs": (60, torch.float32, {}, {}, "backward",  # 3 N <= 2 V: the default
                    "_lce_dhidden_slab_kernel"),
    "rows": (150, torch.float32, {}, {}, "backward", "_lce_dhidden_kernel"),  # 3 N > 2 V
    "rows_knob": (60, torch.float32, {"schedule": "rows"}, {}, "backward",
                  "_lce_dhidden_kernel"),
    "grad_in_forward": (60, torch.float32, {"grad_in_forward": True}, {}, "grad_in_forward",
                        "_lce_dhidden_kernel"),
    "blas_bound": (150, torch.bfloat16, {}, {"max_valid_tokens": 150}, "blas", "blas_gemm"),
    "blas_always": (60, torch.bfloat16, {"blas": "always"}, {}, "blas", "blas_gemm"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_frozen_hidden_skips_the_grad_hidden_gemm(case, spies, device, monkeypatch):
    tokens, dtype, blocks, opts, schedule, dhidden = CASES[case]
    monkeypatch.setattr(triton_impl, "BLOCKS_OVERRIDE", dict(blocks))
    monkeypatch.setattr(api, "ROW_QUANTUM", 16)  # (a bound below N where one is given)
    inputs = make_lm_head_inputs((tokens,), H, V, dtype=dtype, device=device, ignored=0.3,
                                 bias=True)
    _, grads = _check("triton", inputs, freeze=("hidden",), **opts)
    assert grads["hidden"] is None and grads["weight"] is not None
    assert spies.need == [(schedule, False, True, True)]
    assert not any(spies.launches.values()), spies.launches
    # Non-vacuous: with a trainable hidden state the same spies see the grad_hidden work.
    spies.need.clear()
    _check("triton", inputs, **opts)
    assert spies.need == [(schedule, True, True, True)]
    assert spies.launches[dhidden] > 0 and sum(spies.launches.values()) == \
        spies.launches[dhidden], spies.launches


def test_only_the_bias_trains(spies, device):
    """Hidden and weight frozen, a trainable bias: neither GEMM of the backward runs."""
    inputs = make_lm_head_inputs((60,), H, V, device=device, ignored=0.3, bias=True)
    _, grads = _check("triton", inputs, freeze=("hidden", "weight"))
    assert grads["bias"] is not None
    assert spies.need == [("backward", False, False, True)]
    assert not any(spies.launches.values()), spies.launches
