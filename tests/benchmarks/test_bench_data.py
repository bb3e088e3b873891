# The data loader benchmark runs end to end on the CPU at a tiny size (executed, not timed).
import csv
import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_data.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_data", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_bench_data_tiny_writes_records(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OLAVLM_RESULTS_DIR", str(tmp_path / "results"))
    bench = _load_bench()
    argv = ["--num-samples", "12", "--batch-size", "4", "--workers", "0,1", "--image-size", "32",
            "--jpeg-size", "64x48", "--warmup", "1", "--dir", str(tmp_path / "data")]
    assert bench.main(argv) == 0
    rows = list(csv.DictReader((tmp_path / "results" / "data_loader.csv").open()))
    assert [(r["mode"], r["provider"]) for r in rows] == [
        ("synthetic", "workers0"), ("synthetic", "workers1"), ("jpeg", "workers0"),
        ("jpeg", "workers1")]
    for r in rows:
        assert float(r["ms"]) > 0 and "samples/s" in r["note"] and r["shape"] == "B4xS32"
    images = sorted((tmp_path / "data" / "jpeg_64x48" / "images").iterdir())
    assert len(images) == 12 and images[0].suffix == ".jpg"
    assert "samples/s" in capsys.readouterr().out
