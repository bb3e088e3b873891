# Test configuration: Triton interpreter without a GPU, seeds, gpu/slow/distributed markers.
import os

# Must happen before anything imports triton: on a machine without a GPU every Triton kernel
# runs under the CPU interpreter, so the whole suite exercises the kernels. (torch does not
# import triton on `import torch`; importing torch here to ask for CUDA is safe.)
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import random  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA/ROCm GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: takes more than ~20 s on the 2-core CPU machine")
    config.addinivalue_line("markers", "distributed: spawns several processes (gloo on CPU)")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _keep_fp32_matmul_precision():
    """A test that runs a training job on CUDA (parallel.tf32) must not turn the next test's
    fp32 comparisons into TF32 ones: put the process-wide settings back after each test."""
    from olavlm.train.parallel import set_tf32_state, tf32_state

    state = tf32_state()
    yield
    set_tf32_state(state)


@pytest.fixture
def device() -> str:
    """Where the Triton path runs in this session: CUDA if present, else CPU (interpreter)."""
    return "cuda" if HAS_CUDA else "cpu"
