# benchmarks/gpu/kernel_report.py: the compiler's view of a kernel, for both GPU targets.
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _report(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    return subprocess.run([sys.executable, os.path.join(REPO, "benchmarks/gpu/kernel_report.py"),
                           *args], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("target", ["sm_90", "gfx942"])
def test_report_reads_registers_and_shared_memory(tmp_path, target):
    proc = _report(tmp_path, "--target", target, "--filter", "embedding_loss.rows", "--markdown")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| `")]
    # seed mode x with/without the contrastive term x 16, 32, 256 candidates
    assert len(rows) == 12, proc.stdout
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        regs, spill, smem = cells[1], cells[2], cells[3]
        assert regs.isdigit() and 0 < int(regs) <= 512, row
        assert spill.isdigit(), row
        assert smem.split()[0].isdigit() and "too big" not in smem, row
    if target == "sm_90":  # many candidates: small blocks pipelined (tl.range num_stages=3)
        piped = [r for r in rows if "dot=True,GC256" in r]
        assert len(piped) == 2 and all(int(r.strip("|").split("|")[5]) > 0 for r in piped), \
            proc.stdout


def test_report_refuses_the_interpreter(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks/gpu/kernel_report.py")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "unset TRITON_INTERPRET" in proc.stderr
