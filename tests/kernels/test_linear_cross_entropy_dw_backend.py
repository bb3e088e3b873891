# linear_cross_entropy's Triton backward with grad_weight/grad_bias by cuBLAS (dw_backend="torch").
"""dw_backend="torch" multiplies every row of each backward chunk, labelled or not, so the rows
past the device-side count must hold zero dlogits (ZERO_PAST_COUNT) and the gradients must still
equal the float64 reference. Several chunks (a tiny dlogits budget) and ragged N throughout:
chunks wholly past the count, one partly labelled, a last chunk shorter than the buffer.
"""
import os
import subprocess
import sys

import pytest
import torch
from test_linear_cross_entropy import DTYPES, _check, _run

from olakernels.linear_cross_entropy.impl import triton as triton_impl
from olakernels.linear_cross_entropy.impl.triton_kernels import _lce_dlogits_kernel
from olakernels.testing import make_lm_head_inputs

RAGGED = ((150,), 23, 101)  # N not a multiple of the 16-row interpreter tile; prime H and V


@pytest.fixture
def torch_dw(monkeypatch):
    """dw_backend="torch" and 32-row chunks (5 of them at N=150); monkeypatch restores both."""
    monkeypatch.setattr(triton_impl, "BLOCKS_OVERRIDE", {"dw_backend": "torch"})
    monkeypatch.setattr(triton_impl, "DLOGITS_BUDGET_BYTES", 32 * 101 * 4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ignored", [0.0, 0.5, 1.0])
def test_torch_dw_matches_reference(torch_dw, dtype, ignored, device):
    inputs = make_lm_head_inputs(*RAGGED, dtype=dtype, device=device, ignored=ignored, bias=True)
    _check("triton", inputs)


@pytest.mark.parametrize("frozen", [("weight",), ("weight", "bias"), ("hidden",)])
def test_torch_dw_frozen_inputs(torch_dw, frozen, device, monkeypatch):
    calls = []
    original = triton_impl._dweight_torch
    monkeypatch.setattr(triton_impl, "_dweight_torch",
                        lambda *args: calls.append(1) or original(*args))
    inputs = make_lm_head_inputs(*RAGGED, device=device, ignored=0.5, bias=True)
    _, grads = _check("triton", inputs, freeze=frozen)
    assert all(grads[name] is None for name in frozen)
    # Bias only (frozen weight): the cheap column sum still runs; nothing trainable: no dW work.
    assert bool(calls) == (frozen != ("weight", "bias"))


def test_torch_dw_with_every_option(torch_dw, device):
    inputs = make_lm_head_inputs(*RAGGED, dtype=torch.bfloat16, device=device, ignored=0.3,
                                 bias=True)
    _check("triton", inputs, label_smoothing=0.2, z_loss_weight=1e-3, logit_softcap=5.0,
           reduction="sum")


def test_torch_and_triton_dw_agree(device, monkeypatch):
    monkeypatch.setattr(triton_impl, "DLOGITS_BUDGET_BYTES", 32 * 101 * 4)
    inputs = make_lm_head_inputs(*RAGGED, device=device, ignored=0.5, bias=True)
    _, by_triton = _run("triton", *inputs)
    monkeypatch.setattr(triton_impl, "BLOCKS_OVERRIDE", {"dw_backend": "torch"})
    _, by_torch = _run("triton", *inputs)
    assert torch.equal(by_torch["hidden"], by_triton["hidden"])  # same kernel
    for name in ("weight", "bias"):
        torch.testing.assert_close(by_torch[name], by_triton[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dw_backend", ["triton", "torch"])
def test_non_finite_hidden_in_ignored_rows_does_not_reach_grad_weight(dw_backend, device,
                                                                      monkeypatch):
    # Padding positions may hold garbage; neither backend may multiply it into grad_weight
    # (the torch backend reads those rows in its gather: it zeroes them).
    monkeypatch.setattr(triton_impl, "BLOCKS_OVERRIDE", {"dw_backend": dw_backend})
    monkeypatch.setattr(triton_impl, "DLOGITS_BUDGET_BYTES", 32 * 101 * 4)
    hidden, weight, labels, bias = make_lm_head_inputs(*RAGGED, device=device, ignored=0.5,
                                                       bias=True)
    ignored = labels == -100
    _, clean = _run("triton", hidden.masked_fill(ignored[:, None], 0.0), weight, labels, bias)
    poisoned = hidden.masked_fill(ignored[:, None], float("nan"))
    poisoned[ignored.nonzero()[0]] = float("inf")
    _, dirty = _run("triton", poisoned, weight, labels, bias)
    for name in ("weight", "bias"):
        assert torch.equal(dirty[name], clean[name]), name
    assert torch.equal(dirty["hidden"], clean["hidden"])


def test_dlogits_kernel_zeroes_rows_past_the_count(device):
    """ZERO_PAST_COUNT: the rows past the count, in whole blocks and inside the partly labelled
    block, get 0 over a NaN-filled buffer; the labelled rows are unchanged."""
    hidden, weight, labels, _ = make_lm_head_inputs((40,), 23, 101, device=device, ignored=0.5)
    _, _, lse, order, count = triton_impl.lce_forward(hidden, weight, None, labels, -100, 0.0,
                                                      0.0, 0.0)
    num = int(count)
    assert num % 16 and num < 32  # a partly labelled 16-row block and a block past the count
    bufs = []
    for zero in (False, True):
        buf = torch.full((48, 101), float("nan"), device=device)
        _lce_dlogits_kernel[(3, triton_impl.triton.cdiv(101, 32))](
            hidden, weight, weight, order, labels, count, lse, torch.ones(40, device=device), buf,
            0, 0, 101, 101, 23, 1.0, 0.0, 0.0,
            HAS_BIAS=False, HAS_SOFTCAP=False, DOT_NATIVE=False, BLOCK_N=16, BLOCK_V=32,
            BLOCK_K=32, ZERO_PAST_COUNT=zero,
        )
        bufs.append(buf)
    assert bufs[0][num:].isnan().all()  # without the flag those rows are not written
    assert torch.count_nonzero(bufs[1][num:]) == 0
    assert torch.equal(bufs[1][:num], bufs[0][:num]) and bufs[1][:num].isfinite().all()


def test_unknown_dw_backend_is_a_value_error(monkeypatch, device):
    monkeypatch.setattr(triton_impl, "BLOCKS_OVERRIDE", {"dw_backend": "cublas"})
    hidden, weight, labels, _ = make_lm_head_inputs((8,), 16, 40, device=device)
    with pytest.raises(ValueError, match="dw_backend"):
        _run("triton", hidden, weight, labels)


def test_torch_dw_opcheck(torch_dw, device):
    hidden, weight, labels, bias = make_lm_head_inputs((24,), 16, 40, device=device, bias=True)
    with torch.no_grad():
        _, _, lse, order, count = triton_impl.linear_cross_entropy_fwd(
            hidden, weight, bias, labels, -100, 0.1, 1e-3, 0.0)
    torch.library.opcheck(
        triton_impl.linear_cross_entropy_bwd,
        (hidden, weight, bias, labels, order, count, lse, torch.rand(24, device=device), 0.1,
         1e-3, 0.0, True, True, True),
    )


# ---- GPU: cuBLAS with a fp32 output, real vocabulary sizes ----

@pytest.mark.gpu
@pytest.mark.parametrize("ignored", [0.0, 0.9])
def test_gpu_torch_dw_real_vocabulary(ignored, monkeypatch):
    monkeypatch.setattr(triton_impl, "BLOCKS_OVERRIDE", {"dw_backend": "torch"})
    monkeypatch.setattr(triton_impl, "DLOGITS_BUDGET_BYTES", 256 * 32064 * 2)  # 4 chunks
    inputs = make_lm_head_inputs((1000,), 1024, 32064, dtype=torch.bfloat16, device="cuda",
                                 ignored=ignored, bias=True)
    _check("triton", inputs, label_smoothing=0.05)
    # The fp32-output GEMMs ran (no silent fallback to fp32 copies of the operands).
    assert triton_impl._FP32_OUT_GEMM.get(("cuda", torch.bfloat16, False)) is True
    assert triton_impl._FP32_OUT_GEMM.get(("cuda", torch.bfloat16, True)) is True


_COMPILE_ZERO_VARIANT = """
from olakernels import _aot
for name, target in _aot.TARGETS.items():
    zero = [v for v in _aot.linear_cross_entropy_variants(target)
            if v.constexprs.get("ZERO_PAST_COUNT") and not v.constexprs.get("WRITE_LOGITS")
            and "bf16" in v.name]
    assert zero, "no ZERO_PAST_COUNT variant in olakernels/_aot.py"
    for v in zero:  # as the JIT builds it (pipelined) and for odd sizes
        for specialize in (True, False):
            _aot.compile_variant(v, target, specialize)
    print("compiled ZERO_PAST_COUNT for", name)
"""


def test_zero_past_count_variant_compiles_for_hopper_and_mi300x(tmp_path):
    """The store-and-return branch is a nested early exit: only the GPU compilers check it.
    test_triton_compiles_for_gpus.py compiles it among every kernel; this is the quick check
    of that branch alone (~10 s)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    here = os.path.dirname(os.path.abspath(__file__))
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(here)) + os.pathsep + \
        env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _COMPILE_ZERO_VARIANT], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("compiled ZERO_PAST_COUNT") == 2
