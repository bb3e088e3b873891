# The linear cross-entropy benchmark runs end to end on the CPU at tiny shapes (not timed).
import csv
import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_linear_cross_entropy.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_linear_cross_entropy", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_bench_cli_tiny_writes_records(tmp_path, monkeypatch):
    monkeypatch.setenv("OLAVLM_RESULTS_DIR", str(tmp_path))
    bench = _load_bench()
    assert bench.main(["--preset", "tiny", "--providers", "eager,triton"]) == 0
    rows = list(csv.DictReader((tmp_path / "linear_cross_entropy.csv").open()))
    cases = bench.cases("tiny")
    assert len(rows) == 2 * len(cases)
    assert {r["mode"] for r in rows} == {"fwd_bwd", "fwd_bwd_frozenW"}
    for r in rows:
        assert float(r["ms"]) > 0 and float(r["tflops"]) > 0
    # FLOPs are counted on labelled rows only: 90% ignored is a tenth of the work.
    full = next(c for c in cases if c.ignored == 0.0 and c.train_weight)
    sparse = next(c for c in cases if c.ignored == 0.9 and c.train_weight)
    assert bench.min_flops(full) == 6 * 64 * 256 * 32
    assert bench.min_flops(sparse) == 6 * (64 - 58) * 256 * 32
