# CPU tests of the benchmark harness: timing, CSV history, throughput formulas and report CLI.
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

# `python -m pytest` from the repo root already has it on sys.path; other launchers may not.
REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import common, report  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _isolated_results(tmp_path, monkeypatch):
    """Every test writes into its own tmp folder with a fixed sha (never the repo's results)."""
    monkeypatch.setenv("OLAVLM_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setenv("OLAVLM_GIT_SHA", "abc123def456")
    return tmp_path / "results"


def _record(provider="triton", ms=2.0, op="toy_op", **kw):
    timing = common.Timing(median_ms=ms, p20_ms=ms * 0.9, p80_ms=ms * 1.1, n=10)
    return common.make_record(op=op, provider=provider, mode="fwd", shape=(8, 16),
                              dtype="bfloat16", timing=timing, **kw)


def test_do_bench_cpu_is_positive_and_ordered():
    t = common.do_bench(lambda: sum(range(2000)), warmup=1, rep=20, device="cpu")
    assert t.n == 20
    assert 0 < t.p20_ms <= t.median_ms <= t.p80_ms


def test_do_bench_cpu_excludes_setup_time():
    calls = []
    t = common.do_bench(lambda: calls.append("fn"), setup=lambda: time.sleep(0.005),
                        warmup=2, rep=5, device="cpu")
    assert len(calls) == 7
    assert t.p80_ms < 5.0  # the 5 ms sleeps in setup are not counted


def test_peak_memory_delta_is_none_on_cpu():
    assert common.peak_memory_delta(lambda: None, device="cpu") is None


def test_gbps_and_tflops_formulas():
    assert common.gbps(2e9, 1000.0) == pytest.approx(2.0)  # 2 GB in 1 s
    assert common.gbps(4 * 2**30, 1.0) == pytest.approx(4 * 2**30 / 1e6)
    assert common.tflops(2e12, 1.0) == pytest.approx(2000.0)  # 2 TFLOP in 1 ms
    with pytest.raises(ValueError):
        common.gbps(1, 0.0)


def test_make_record_derives_rates_and_environment():
    rec = _record(num_bytes=4_000_000, num_flops=8_000_000_000, peak_bytes=3 * 2**20)
    assert rec.gbps == pytest.approx(2.0)  # 4 MB in 2 ms
    assert rec.tflops == pytest.approx(4.0)  # 8 GFLOP in 2 ms
    assert rec.peak_mib == pytest.approx(3.0)
    assert rec.extra_mib is None
    assert rec.shape == "8x16"
    assert rec.git_sha == "abc123def456"
    assert rec.device in ("cpu", "cuda")
    env = common.environment()
    expected = {"device", "gpu_name", "torch", "triton", "cuda", "python", "git_sha", "hostname"}
    assert expected <= set(env)


def test_append_records_writes_header_once_and_never_rewrites(_isolated_results):
    first = _record(provider="reference", num_bytes=1000)
    (path,) = common.append_records([first])
    assert path == _isolated_results / "toy_op.csv"
    text_after_first = path.read_text()
    assert text_after_first.splitlines()[0] == ",".join(common.FIELDNAMES)

    common.append_records([_record(provider="triton", ms=1.0)])
    assert path.read_text().startswith(text_after_first)
    rows = common.read_records(_isolated_results)
    assert [r["provider"] for r in rows] == ["reference", "triton"]
    assert rows[0]["ms"] == pytest.approx(2.0)
    assert rows[0]["bytes"] == 1000
    assert rows[0]["tflops"] is None  # empty cell -> None
    assert rows[0]["timestamp"] == first.timestamp


def test_append_records_refuses_a_different_header(_isolated_results):
    path = _isolated_results / "toy_op.csv"
    path.parent.mkdir(parents=True)
    path.write_text("timestamp,op,ms\n2026-01-01,toy_op,1.0\n")
    with pytest.raises(ValueError, match="toy_op.csv"):
        common.append_records([_record()])
    assert path.read_text() == "timestamp,op,ms\n2026-01-01,toy_op,1.0\n"


def test_format_table_aligns_and_marks_missing():
    table = common.format_table([_record()], ("provider", "ms", "gbps"), {"gbps": "GB/s"})
    lines = table.splitlines()
    assert lines[0].split() == ["provider", "ms", "GB/s"]
    assert lines[2].split() == ["triton", "2.000", "-"]


def test_report_prints_table_speedup_and_plot(tmp_path, capsys, _isolated_results):
    common.append_records([_record(provider="reference", ms=3.0, num_bytes=6_000_000),
                           _record(provider="triton", ms=1.5, num_bytes=6_000_000)])
    png = tmp_path / "history.png"
    assert report.main(["--latest", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "reference" in out and "triton" in out
    assert "2.00x" in out  # 3.0 ms / 1.5 ms
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_report_speedups_name_their_baseline_and_mark_other_runs():
    def row(provider, ms, sha, op="toy_op"):
        return {"op": op, "provider": provider, "mode": "fwd", "shape": "4", "dtype": "bf16",
                "gpu_name": "H100", "ms": ms, "git_sha": sha, "timestamp": "2026-01-01"}

    ups = report.speedups([row("eager", 4.0, "a"), row("ours", 2.0, "a"),
                           row("liger", 1.0, "b"),
                           row("seed", 9.0, "c", op="step"), row("reference", 3.0, "c", op="step"),
                           row("fused", 1.0, "c", op="step")])
    got = {(u["op"], u["provider"]): (u["baseline"], u["speedup"]) for u in ups}
    assert got[("toy_op", "ours")] == ("eager", "2.00x")
    assert got[("toy_op", "liger")] == ("eager", "4.00x (other runs)")
    assert got[("step", "fused")] == ("seed", "9.00x")  # the step's goal is against the seed
    assert got[("step", "reference")] == ("seed", "3.00x")


def test_report_skips_damaged_rows_and_untimed_cases(_isolated_results, capsys):
    """A cell that is not a number, bytes that are not UTF-8 and a row cut short (a killed
    writer) cost their row, not the report; an out-of-memory row (ms NaN) gets no speedup."""
    common.append_records([_record(provider="reference", ms=3.0),
                           _record(provider="triton", ms=1.5),
                           _record(provider="oom", ms=float("nan"))])
    path = _isolated_results / "toy_op.csv"
    good = path.read_bytes()
    header, first = good.splitlines()[:2]
    bad_number = first.replace(b",3.0,", b",3.0e,", 1)
    assert bad_number != first
    path.write_bytes(good + bad_number + b"\n" + first[:-5] + b"\xff\xfe\n" + first[:40])
    rows = common.read_records(path)
    assert [r["provider"] for r in rows] == ["reference", "triton", "oom"]
    assert capsys.readouterr().err.count("(skipped toy_op.csv line") == 3
    ups = {u["provider"]: u["speedup"] for u in report.speedups(rows)}
    assert ups == {"triton": "2.00x"}


def test_report_on_empty_dir(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert report.main(["--results", str(empty)]) == 0
    assert "no benchmark records" in capsys.readouterr().out


def test_ceilings_skip_without_cuda(capsys, _isolated_results):
    if common.environment()["device"] == "cuda":
        pytest.skip("CUDA present: ceilings would really run")
    sys.path.insert(0, str(REPO_ROOT / "benchmarks" / "gpu"))
    try:
        import ceilings
    finally:
        sys.path.remove(str(REPO_ROOT / "benchmarks" / "gpu"))
    assert ceilings.main() == 0
    assert "no CUDA device" in capsys.readouterr().out
    assert not _isolated_results.exists()


def test_cpu_rows_stay_out_of_the_checked_in_history(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("OLAVLM_RESULTS_DIR", raising=False)
    target = tmp_path / "repo_results"
    monkeypatch.setattr(common, "results_dir", lambda: target)  # the checked-in folder
    record = _record()
    assert record.gpu_name == "cpu"
    assert common.append_records([record]) == []
    assert not target.exists() and "not appended" in capsys.readouterr().out
    written = common.append_records([record], cpu_rows=True)  # the loader benchmark's rows
    assert written == [target / "toy_op.csv"] and written[0].exists()
