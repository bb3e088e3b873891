# The doc pages' runnable examples run and agree (the README's main job, `olavlm train`, is
# tests/train/test_train_e2e.py's).
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / script)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_embedding_loss_demo_trains():
    out = _run("embedding_loss_demo.py")
    lines = [ln for ln in out.splitlines() if ln.startswith("step")]
    first, last = (float(ln.split("loss ")[1].split()[0]) for ln in (lines[0], lines[-1]))
    assert last < 0.1 * first, out


def test_hf_causal_lm_example_matches_transformers():
    pytest.importorskip("transformers")
    assert "ok: same loss and gradients" in _run("hf_causal_lm_loss.py")
