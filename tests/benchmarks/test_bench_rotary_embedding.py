# The rotary-embedding benchmark runs end to end on the CPU at tiny shapes (not timed).
import csv


def test_bench_cli_tiny_writes_records(tmp_path, monkeypatch, load_bench):
    monkeypatch.setenv("OLAVLM_RESULTS_DIR", str(tmp_path))
    bench = load_bench("bench_rotary_embedding")
    assert bench.main(["--preset", "tiny"]) == 0
    rows = list(csv.DictReader((tmp_path / "rotary_embedding.csv").open()))
    # eager and ours on the CPU (compile and liger are GPU-only), fwd and fwd_bwd
    assert sorted((r["provider"], r["mode"]) for r in rows) == [
        ("eager", "fwd"), ("eager", "fwd_bwd"), ("ours", "fwd"), ("ours", "fwd_bwd")]
    assert all(float(r["ms"]) > 0 and float(r["gbps"]) > 0 for r in rows)
    case = bench.cases("tiny")[0]
    qk = case.batch * case.length * (case.q_heads + case.k_heads) * case.head_dim * 2
    assert bench.min_bytes(case, "fwd_bwd") == 2 * bench.min_bytes(case, "fwd") == \
        4 * qk + 4 * case.batch * case.length * case.head_dim * 2
