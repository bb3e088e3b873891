# olakernels.testing.track_host_syncs: what counts as a host read and what must not.
import pytest
import torch

from olakernels.testing import track_host_syncs


@torch.library.custom_op("olakernels_tests::scale_by_max", mutates_args=())
def _scale_by_max(x: torch.Tensor) -> torch.Tensor:
    return x / float(x.abs().max())  # a host read hidden inside a custom op


@_scale_by_max.register_fake
def _(x):
    return torch.empty_like(x)


@pytest.mark.parametrize("read", [
    lambda x: x.sum().item(),
    lambda x: bool((x > 0).any()),
    lambda x: int(x.argmax()),
    lambda x: x.nonzero(),
    lambda x: x[x > 0],
    lambda x: x.masked_select(x > 0),
    lambda x: torch.unique(x),
    lambda x: torch.repeat_interleave(torch.tensor([1, 2])),
    lambda x: x.tolist(),
    lambda x: x.numpy(),
    lambda x: _scale_by_max(x),
], ids=["item", "bool", "int", "nonzero", "bool-index", "masked_select", "unique",
        "repeat_interleave", "tolist", "numpy", "inside-custom-op"])
def test_each_kind_of_read_is_one_event(read):
    x = torch.randn(5)
    with track_host_syncs() as syncs:
        read(x)
    assert len(syncs.events) == 1, syncs.events
    why, where = syncs.events[0]
    assert "test_testing_syncs.py" in where  # the stack names the caller


def test_device_side_work_is_not_a_read():
    x = torch.randn(6, 4)
    idx = torch.tensor([0, 2, 5])
    with track_host_syncs() as syncs:
        y = x[idx] * 2  # integer indices: no size to learn
        y = torch.where(y > 0, y, 0).sum(0)
        torch.repeat_interleave(idx, torch.tensor([1, 1, 2]), output_size=4)
        torch._assert_async((x == x).any())  # a device-side assert
        x.cpu()  # already on the host: no copy
    assert not syncs.events, syncs.events


def test_outside_filters_the_allowed_places():
    x = torch.randn(3)
    with track_host_syncs() as syncs:
        x.sum().item()
    assert syncs.outside("test_testing_syncs.py") == []
    assert len(syncs.outside("somewhere_else.py")) == 1


def test_tolist_and_numpy_are_restored():
    before = torch.Tensor.tolist, torch.Tensor.numpy
    with pytest.raises(RuntimeError, match="boom"), track_host_syncs():
        raise RuntimeError("boom")
    assert (torch.Tensor.tolist, torch.Tensor.numpy) == before
