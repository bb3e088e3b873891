# Fixtures for the teacher tests: tiny random-weight teachers saved as users' folders, data.
from __future__ import annotations

import os
from pathlib import Path

import pytest

# Never reach for a hub: every teacher here loads from a local folder.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from teacherhelpers import save_tiny_teachers  # noqa: E402

from olavlm.data.synthetic import write_synthetic_dataset  # noqa: E402


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> dict[str, Path]:
    """{"depth", "seg", "gen"}: folders laid out like the real repositories (the gen weights
    inside ``image_encoder/`` of a pipeline folder), with tiny random weights."""
    return save_tiny_teachers(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="session")
def teacher_synth_dir(tmp_path_factory) -> Path:
    """A synthetic dataset: 24 train samples (a few text-only), 64 px, with exact maps."""
    out = tmp_path_factory.mktemp("tsynth")
    write_synthetic_dataset(out, 24, size=64, seed=5, text_only_fraction=0.15)
    return out
