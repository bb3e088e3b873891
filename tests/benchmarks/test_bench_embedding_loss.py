# The embedding-loss benchmark runs end to end on the CPU at tiny shapes (executed, not timed).
import csv


def test_bench_cli_tiny_writes_records(tmp_path, monkeypatch, capsys, load_bench):
    monkeypatch.setenv("OLAVLM_RESULTS_DIR", str(tmp_path))
    bench = load_bench("bench_embedding_loss")
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
