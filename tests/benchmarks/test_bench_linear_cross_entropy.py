# The linear cross-entropy benchmark runs end to end on the CPU at tiny shapes (not timed).
import csv


def test_bench_cli_tiny_writes_records(tmp_path, monkeypatch, load_bench):
    monkeypatch.setenv("OLAVLM_RESULTS_DIR", str(tmp_path))
    bench = load_bench("bench_linear_cross_entropy")
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


def test_liger_on_the_gathered_rows_computes_the_same_loss(load_bench):
    """liger_gathered (the fair comparison for ours with a bound) must measure the same math:
    its loss and gradients equal eager's on the full rows."""
    import pytest
    import torch

    pytest.importorskip("liger_kernel")
    bench = load_bench("bench_linear_cross_entropy")
    case = next(c for c in bench.cases("tiny") if c.ignored == 0.9 and c.train_weight)
    hidden, weight, labels = bench.inputs(case, "cpu")
    hidden, weight = hidden.detach().float(), weight.detach().float()
    results = []
    for provider in ("eager", "liger_gathered"):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        loss = bench.loss_fn(provider, case)(h, w, labels)
        loss.backward()
        results.append((loss.detach(), h.grad, w.grad))
    for want, got in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
