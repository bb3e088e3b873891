# The OLA-VLM training-step benchmark runs end to end on the CPU at the tiny preset (not timed).
import csv
import math

import torch


def test_bench_step_cli_tiny_writes_records(tmp_path, monkeypatch, load_bench, capsys):
    monkeypatch.setenv("OLAVLM_RESULTS_DIR", str(tmp_path))
    bench = load_bench("bench_step")
    assert bench.main(["--preset", "tiny", "--batch", "2"]) == 0
    rows = list(csv.DictReader((tmp_path / "ola_step.csv").open()))
    assert [r["provider"] for r in rows] == list(bench.PROVIDERS)
    for r in rows:
        assert r["op"] == "ola_step" and r["mode"] == "fwd_bwd" and r["dtype"] == "bfloat16"
        assert r["shape"].startswith("tiny-B2-L")
        assert math.isfinite(float(r["ms"])) and float(r["ms"]) > 0
        assert math.isfinite(float(r["tflops"])) and float(r["tflops"]) > 0
        assert "samples/s" in r["note"] and "tokens/s" in r["note"]
    assert "speedup" in capsys.readouterr().out


def test_both_providers_train_the_same_parameters_on_the_same_loss(load_bench):
    # The comparison is fair only if both paths compute the same step: same loss (bf16
    # rounding aside) and gradients on exactly the pre-training parameters.
    bench = load_bench("bench_step")
    preset = bench.PRESETS["tiny"]
    model, _ = bench.build_model(preset, "cpu")
    batch = bench.make_batch(model, preset, 3, "cpu")
    assert not any(p.requires_grad for p in model.llm.parameters())
    assert not any(p.requires_grad for p in model.vision_tower.parameters())
    losses, grads = {}, {}
    for provider in bench.PROVIDERS:
        model.set_impl(bench.IMPL[provider])
        model.zero_grad(set_to_none=True)
        out = model(batch.input_ids, batch.attention_mask, batch.labels, batch.images,
                    batch.image_mask, batch.targets)
        out.loss.backward()
        losses[provider] = out.loss.item()
        grads[provider] = {n for n, p in model.named_parameters() if p.grad is not None}
    assert math.isclose(losses["reference"], losses["fused"], rel_tol=2e-2)
    assert grads["reference"] == grads["fused"]
    assert {n.split(".")[0] for n in grads["fused"]} == {
        "mm_projector", "task_tokens", "image_gen_heads", "image_depth_heads",
        "image_seg_heads", "gen_logit_scale", "depth_logit_scale", "seg_logit_scale"}
    # Labels on the caption only: > 80% of the spliced positions are ignored, as in pre-training.
    assert int((batch.labels != -100).sum()) < 0.2 * sum(batch.lengths)
    assert bench.step_flops(model, preset, batch) > 0


def test_out_of_memory_is_recorded_and_larger_batches_skipped(tmp_path, monkeypatch, load_bench,
                                                             capsys):
    monkeypatch.setenv("OLAVLM_RESULTS_DIR", str(tmp_path))
    bench = load_bench("bench_step")
    real_build, real_do_bench = bench.build_model, bench.common.do_bench
    built = {}

    def build_model(preset, device):  # keep the model to see which path is being timed
        built["model"], seconds = real_build(preset, device)
        return built["model"], seconds

    def do_bench(fn, **kwargs):  # the reference path "runs out of memory"
        if built["model"].impl == "reference":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_do_bench(fn, **kwargs)

    monkeypatch.setattr(bench, "build_model", build_model)
    monkeypatch.setattr(bench.common, "do_bench", do_bench)
    assert bench.main(["--preset", "tiny", "--batch", "2,3"]) == 0
    rows = list(csv.DictReader((tmp_path / "ola_step.csv").open()))
    # reference: OOM at B=2 (recorded), not run at B=3; fused: both batches measured.
    assert [(r["provider"], r["shape"].split("-")[1]) for r in rows] == [
        ("reference", "B2"), ("fused", "B2"), ("fused", "B3")]
    assert math.isnan(float(rows[0]["ms"])) and rows[0]["note"].startswith("OOM")
    assert all(math.isfinite(float(r["ms"])) for r in rows[1:])
    assert "skipped (OOM at a smaller batch)" in capsys.readouterr().out
