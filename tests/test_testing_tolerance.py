# olakernels.testing.assert_close_to_reference: the budget every op test leans on must fail.
import math

import pytest
import torch

from olakernels.testing import assert_close_to_reference

REF = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)


def test_a_close_output_passes_and_a_far_one_fails():
    eager = REF.float() + torch.tensor([1e-3, 0.0, 0.0])
    assert_close_to_reference(REF.float() + 1e-3, REF, eager, name="x")
    with pytest.raises(AssertionError, match="x: max abs error"):
        assert_close_to_reference(REF.float() + 1.0, REF, eager, name="x")


def test_where_eager_overflowed_no_output_passes_for_free():
    """An eager inf (or NaN) against a finite reference made the budget infinite: any finite
    output passed, e.g. [1e4, -5e3, 42] against [1, 2, 3]."""
    eager = torch.tensor([1.0, math.inf, 3.0])
    with pytest.raises(AssertionError, match="exceeds the budget"):
        assert_close_to_reference(torch.tensor([1e4, -5e3, 42.0]), REF, eager, name="x")
    assert_close_to_reference(REF.float(), REF, eager, name="x")  # the right answer passes
    with pytest.raises(AssertionError, match="exceeds the budget"):
        assert_close_to_reference(torch.tensor([1.0, 2.5, 3.0]), REF,
                                  torch.tensor([1.0, math.nan, 3.0]), name="x")


def test_nan_and_infinite_references_must_be_met():
    ref = torch.tensor([1.0, math.nan, math.inf], dtype=torch.float64)
    assert_close_to_reference(torch.tensor([1.0, math.nan, math.inf]), ref, None, name="x")
    with pytest.raises(AssertionError, match="NaN pattern"):
        assert_close_to_reference(torch.tensor([1.0, 0.0, math.inf]), ref, None, name="x")
    with pytest.raises(AssertionError, match="the reference is inf"):
        assert_close_to_reference(torch.tensor([1.0, math.nan, 6e4]), ref, None, name="x")


def test_the_budget_is_twice_the_eager_error_by_default():
    """k = 2: an output twice as far from the reference as eager is at the limit, 2.5 times
    is out (the floor, ~1e-6 here, is far below the 1e-3 eager error)."""
    eager = REF.float() + torch.tensor([1e-3, 0.0, 0.0])
    assert_close_to_reference(REF + torch.tensor([1.9e-3, 0.0, 0.0], dtype=torch.float64), REF,
                              eager, name="x", dtype=torch.float32)
    for error in (2.5e-3, 5e-3):
        with pytest.raises(AssertionError, match="exceeds the budget"):
            assert_close_to_reference(REF + torch.tensor([error, 0.0, 0.0], dtype=torch.float64),
                                      REF, eager, name="x", dtype=torch.float32)


def test_the_floor_grows_with_the_square_root_of_the_reduction_size():
    """floor = floor_ulps * eps * sqrt(n) * max|ref|: rounding errors of a sum of n terms grow
    like sqrt(n), not n. With eager exact (no eager budget) and n = 4, an error of 1.5 times the
    n = 1 floor passes and 3 times fails (a floor growing like n would let it pass)."""
    floor_1 = 4.0 * torch.finfo(torch.float32).eps * 3.0  # floor_ulps * eps * max|ref|
    for error, n, ok in ((1.5, 1, False), (1.5, 4, True), (3.0, 4, False), (2.5, 9, True)):
        out = REF + torch.tensor([error * floor_1, 0.0, 0.0], dtype=torch.float64)
        if ok:
            assert_close_to_reference(out, REF, REF.float(), name="x", dtype=torch.float32,
                                      reduction_size=n)
        else:
            with pytest.raises(AssertionError, match="exceeds the budget"):
                assert_close_to_reference(out, REF, REF.float(), name="x", dtype=torch.float32,
                                          reduction_size=n)


def test_an_infinite_reference_must_be_met_with_its_sign():
    """+inf where the reference is -inf (an overflow of the wrong sign) is an error."""
    ref = torch.tensor([1.0, -math.inf, math.inf], dtype=torch.float64)
    assert_close_to_reference(torch.tensor([1.0, -math.inf, math.inf]), ref, None, name="x")
    with pytest.raises(AssertionError, match="the reference is -inf"):
        assert_close_to_reference(torch.tensor([1.0, math.inf, math.inf]), ref, None, name="x")
    with pytest.raises(AssertionError, match="the reference is inf"):
        assert_close_to_reference(torch.tensor([1.0, -math.inf, -math.inf]), ref, None, name="x")


@pytest.mark.parametrize("shape", [(3, 1), (1, 3)])
def test_the_output_must_have_the_reference_shape(shape):
    """An output of the right values in another shape (a kept or a missing dimension) is an
    error, not broadcast against the reference: (1, 3) against (3,) would compare equal."""
    with pytest.raises(AssertionError, match=r"x: shape \(\d, \d\) differs from the reference"):
        assert_close_to_reference(REF.float().reshape(shape), REF, REF.float(), name="x")
