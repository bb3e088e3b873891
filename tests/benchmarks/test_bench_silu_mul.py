# The silu_mul benchmark runs end to end on the CPU at tiny shapes (not timed).
import csv


def test_bench_cli_tiny_writes_records(tmp_path, monkeypatch, load_bench):
    monkeypatch.setenv("OLAVLM_RESULTS_DIR", str(tmp_path))
    bench = load_bench("bench_silu_mul")
    assert bench.main(["--preset", "tiny"]) == 0
    rows = list(csv.DictReader((tmp_path / "silu_mul.csv").open()))
    assert sorted((r["provider"], r["mode"]) for r in rows) == [
        ("eager", "fwd"), ("eager", "fwd_bwd"), ("ours", "fwd"), ("ours", "fwd_bwd"),
        ("ours_inplace", "fwd"), ("ours_inplace", "fwd_bwd")]
    assert all(float(r["ms"]) > 0 and float(r["gbps"]) > 0 for r in rows)
    case = bench.cases("tiny")[0]  # chunked halves (Phi-3's pattern): the floor is the same;
    assert case.chunked  # autograd's join of the two gradients is overhead, not needed bytes
    assert bench.min_bytes(case, "fwd_bwd") * 3 == bench.min_bytes(case, "fwd") * 8
    plain = bench.Case("plain", case.tokens, case.intermediate)
    assert bench.min_bytes(plain, "fwd_bwd") * 3 == bench.min_bytes(plain, "fwd") * 8
