# benchmarks/gpu/run.sh on a machine without a GPU (its dry run): records stay out of the
# checked-in history, come back under $OUT after each stage, and the time budget cuts stages.
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="a dry run needs a machine without a GPU")


def _run(tmp_path, rc=0, **env):
    out = tmp_path / "out"
    full = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, **env}
    full.pop("OLAVLM_RESULTS_DIR", None)
    proc = subprocess.run(["bash", str(REPO / "benchmarks/gpu/run.sh")], env=full, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == rc, proc.stderr
    return out, proc.stdout + proc.stderr


def test_a_dry_run_writes_under_out_not_into_the_history(tmp_path):
    history = REPO / "benchmarks/results/rotary_embedding.csv"
    before = history.read_bytes() if history.exists() else None
    out, printed = _run(tmp_path, OLAVLM_STAGES="bench_rope", OLAVLM_BUDGET_S="300")
    rows = (out / "rotary_embedding.csv").read_text().splitlines()
    assert rows[0].startswith("timestamp,git_sha,op,") and len(rows) > 1
    assert all(",cpu," in row for row in rows[1:])
    assert (out / "results" / "rotary_embedding.csv").is_file()
    assert (history.read_bytes() if history.exists() else None) == before
    assert "== bench_rope: rc=0" in printed and "baseline liger-kernel" in printed


def test_the_budget_skips_what_would_not_fit(tmp_path):
    out, printed = _run(tmp_path, OLAVLM_STAGES="bench_rope", OLAVLM_BUDGET_S="5")
    assert "== bench_rope: skipped (" in printed and "left of OLAVLM_BUDGET_S=5)" in printed
    assert not (out / "rotary_embedding.csv").exists()


def test_a_budget_that_is_not_whole_seconds_is_refused(tmp_path):
    _, printed = _run(tmp_path, rc=2, OLAVLM_STAGES="bench_rope", OLAVLM_BUDGET_S="9.5m")
    assert "OLAVLM_BUDGET_S must be whole seconds, got '9.5m'" in printed
