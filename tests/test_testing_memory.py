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


def test_new_storage_for_an_argument_counts():
    """resize_ and out= give a tensor from before the block new storage: that allocates."""
    x, y = torch.empty(0), torch.empty(0)
    a, b = torch.randn(512, 64), torch.randn(64, 256)
    with track_peak_memory() as mem:
        torch.mm(a, b, out=x)  # 512 KiB
        y.resize_(1024, 256)  # 1 MiB
    assert mem.peak >= (512 * 256 + 1024 * 256) * 4, mem.peak


@torch.library.custom_op("olakernels_tests::cpu_kernel_only", mutates_args=())
def _cpu_kernel_only(x: torch.Tensor) -> torch.Tensor:
    raise AssertionError("the default body must not run where a device kernel is registered")


@_cpu_kernel_only.register_kernel("cpu")
def _(x):
    return x * 2


def test_runs_the_kernel_registered_for_the_device():
    x = torch.ones(3)
    with track_peak_memory() as mem:
        out = _cpu_kernel_only(x)
    assert torch.equal(out, torch.full((3,), 2.0)) and mem.peak == 12
