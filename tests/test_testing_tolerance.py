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
