# pytest options for the benchmark suite: which shape preset to run.
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():  # the kernels run under the CPU interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # `import common` from bench modules


def pytest_addoption(parser):
    parser.addoption(
        "--bench-preset", default=None, choices=["tiny", "full"],
        help="shape preset: 'full' (real model shapes, default on GPU) or 'tiny' (CPU smoke run)",
    )


def bench_preset(config) -> str:
    return config.getoption("--bench-preset") or ("full" if torch.cuda.is_available() else "tiny")
