# The perceiver-head benchmark runs end to end on the CPU at tiny shapes (not timed).
import csv


def test_bench_cli_tiny_writes_records(tmp_path, monkeypatch, load_bench):
    monkeypatch.setenv("OLAVLM_RESULTS_DIR", str(tmp_path))
    bench = load_bench("bench_perceiver")
    assert bench.main(["--preset", "tiny"]) == 0
    rows = list(csv.DictReader((tmp_path / "perceiver.csv").open()))
    assert len(rows) == len(bench.cases("tiny")) * len(bench.PROVIDERS)
    assert all(float(r["ms"]) > 0 and float(r["tflops"]) > 0 for r in rows)
    # Shared queries are projected once: the gen head (per-sample queries) pays B times.
    depth, gen = bench.cases("tiny")
    assert bench.forward_flops(depth) > 0 and bench.forward_flops(gen) > 0
