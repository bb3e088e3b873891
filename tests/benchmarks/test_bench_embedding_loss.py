# The embedding-loss benchmark runs end to end on the CPU at tiny shapes (executed, not timed).
import csv
import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_embedding_loss.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_embedding_loss", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_bench_cli_tiny_writes_records(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OLAVLM_RESULTS_DIR", str(tmp_path))
    bench = _load_bench()
    assert bench.main(["--preset", "tiny", "--providers", "reference,torch,triton"]) == 0
    rows = list(csv.DictReader((tmp_path / "embedding_loss.csv").open()))
    cases = bench.cases("tiny")
    assert len(rows) == len(cases) * 2 * 3
    assert {r["provider"] for r in rows} == {"reference", "torch", "triton"}
    for r in rows:
        assert float(r["ms"]) > 0 and float(r["gbps"]) > 0 and r["git_sha"] and r["torch"]
    # The byte formula: fwd reads pred and target once (bf16), fwd_bwd twice plus the grad.
    b, d = cases[0].shape[0], cases[0].per_sample
    assert bench.min_bytes(cases[0], "fwd") == b * d * 2 * 2
    assert bench.min_bytes(cases[0], "fwd_bwd") == 2 * b * d * 2 * 2 + b * d * 2
    assert "triton" in capsys.readouterr().out
