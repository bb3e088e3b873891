# The teacher benchmark runs end to end on the CPU with tiny teachers (executed, not timed).
import csv


def test_bench_teachers_tiny_writes_records(tmp_path, monkeypatch, capsys, load_bench):
    monkeypatch.setenv("OLAVLM_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    bench = load_bench("bench_teachers")
    argv = ["--preset", "tiny", "--batch-size", "3", "--num-images", "6", "--image-size",
            "64x48", "--rep", "1", "--warmup", "0", "--workers", "0", "--storage", "fp8_e4m3",
            "--dir", str(tmp_path / "work")]
    assert bench.main(argv) == 0
    rows = list(csv.DictReader((tmp_path / "results" / "teachers.csv").open()))
    assert [(r["mode"], r["provider"]) for r in rows] == [
        ("depth", "per_image"), ("depth", "batched"), ("seg", "per_image"), ("seg", "batched"),
        ("gen", "per_image"), ("gen", "batched"), ("depth+seg+gen", "extract"),
        ("depth+seg+gen", "cache")]
    for r in rows:
        assert float(r["ms"]) > 0 and "images/s" in r["note"] and r["shape"] == "B3x64x48"
    cache_row = rows[-1]
    assert float(cache_row["gbps"]) > 0 and "a 300 ms step needs" in cache_row["note"]
    # The per-image path is the seed's: the same targets as the batched teacher, up to the
    # resize (PIL on the host vs the device).
    teacher = bench.build("gen", "tiny", "cpu", None)
    image = bench.photos(1, 64, 48)[0]
    from PIL import Image

    seed = teacher.encode(bench.seed_input(teacher, Image.fromarray(
        image.permute(1, 2, 0).numpy())))["gen"]
    batched = teacher([image])["gen"]
    assert (seed - batched).abs().max() < 0.05 * batched.abs().max()
    assert "images/s" in capsys.readouterr().out
