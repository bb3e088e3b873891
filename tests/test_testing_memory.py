# olakernels.testing.track_peak_memory: what it counts and what it must not.
import torch

from olakernels.testing import track_peak_memory


@torch.library.custom_op("olakernels_tests::sum_with_temporary", mutates_args=())
def _sum_with_temporary(x: torch.Tensor) -> torch.Tensor:
    temporary = torch.ones(1024, 1024)  # 4 MiB, freed before the op returns
    return (x * temporary[: x.shape[0], : x.shape[1]]).sum(0)


@_sum_with_temporary.register_fake
def _(x):
    return x.new_empty(x.shape[1:])


def test_counts_the_temporaries_inside_a_custom_op():
    x = torch.randn(4, 8)
    with track_peak_memory() as mem:
        out = _sum_with_temporary(x)
    assert out.shape == (8,)
    assert mem.peak >= 1024 * 1024 * 4, mem.peak
    assert mem.live == out.untyped_storage().nbytes()  # the temporary was released


def test_storages_from_before_the_block_do_not_count():
    x = torch.zeros(256, 256)
    with track_peak_memory() as mem:
        x.add_(1)  # in place: returns x
        x.view(-1)[:10].fill_(2)  # a view of x
        torch.ones(100)  # 400 bytes, freed at once
    assert mem.peak == 400, mem.peak
    assert mem.live == 0
