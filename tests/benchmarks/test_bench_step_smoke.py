# The OLA-VLM training-step benchmark runs end to end on the CPU at the tiny preset (not timed).
import csv
import math

import pytest
import torch


def test_bench_step_cli_tiny_writes_records(tmp_path, monkeypatch, load_bench, capsys):
    # seed (online per-image teachers), fused_cached (given as its old name) and one switch.
    monkeypatch.setenv("OLAVLM_RESULTS_DIR", str(tmp_path))
    bench = load_bench("bench_step")
    assert bench.main(["--preset", "tiny", "--batch", "2",
                       "--providers", "fused_cached_ac,fused,seed"]) == 0
    rows = list(csv.DictReader((tmp_path / "ola_step.csv").open()))
    assert [r["provider"] for r in rows] == ["seed", "fused_cached", "fused_cached_ac"]
    for r in rows:
        assert r["op"] == "ola_step" and r["mode"] == "fwd_bwd" and r["dtype"] == "bfloat16"
        assert r["shape"].startswith("tiny-B2-L")
        assert math.isfinite(float(r["ms"])) and float(r["ms"]) > 0
        assert math.isfinite(float(r["tflops"])) and float(r["tflops"]) > 0
        assert "samples/s" in r["note"] and "tokens/s" in r["note"] and "MFU n/a" in r["note"]
    assert "targets=per_image" in rows[0]["note"] and "impl=reference" in rows[0]["note"]
    assert "'fused' in earlier rows" in rows[1]["note"]
    assert "AC selective: 2/4 blocks" in rows[2]["note"]
    out = capsys.readouterr().out
    assert "speedup" in out and "x seed" in out and "training issue" in out


def test_modes_train_the_same_parameters_on_the_same_targets(load_bench):
    # The comparison is fair only if every mode computes the same step: same loss (bf16
    # rounding aside), gradients on exactly the pre-training parameters, and targets from the
    # online teachers (per image or batched) of the cached ones' shapes and of equal values.
    bench = load_bench("bench_step")
    runner = bench.StepBench(bench.PRESETS["tiny"], "cpu")
    model, batch = runner.model, runner.batch(3)
    assert not any(p.requires_grad for p in model.llm.parameters())
    assert not any(p.requires_grad for p in model.vision_tower.parameters())
    losses, grads = {}, {}
    for provider in ("reference", "fused"):
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
    assert bench.step_flops(model, bench.PRESETS["tiny"], batch) > 0
    seed = runner.targets(bench.MODES["seed"], batch)()
    online = runner.targets(bench.MODES["fused_online"], batch)()
    for task, cached in batch.targets.items():
        assert seed[task].shape == online[task].shape == cached.shape, task
        assert seed[task].dtype == online[task].dtype == cached.dtype, task
        cos = torch.nn.functional.cosine_similarity(seed[task].float().flatten(1),
                                                    online[task].float().flatten(1))
        assert cos.min() > 0.999, (task, cos)  # PIL vs device resize, bf16 forwards


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
    assert bench.main(["--preset", "tiny", "--batch", "2,3",
                       "--providers", "reference,fused_cached"]) == 0
    rows = list(csv.DictReader((tmp_path / "ola_step.csv").open()))
    # fused_cached: both batches measured; reference: OOM at B=2 (recorded), not run at B=3.
    assert [(r["provider"], r["shape"].split("-")[1]) for r in rows] == [
        ("fused_cached", "B2"), ("fused_cached", "B3"), ("reference", "B2")]
    assert math.isnan(float(rows[2]["ms"])) and rows[2]["note"].startswith("OOM")
    assert all(math.isfinite(float(r["ms"])) for r in rows[:2])
    assert "skipped (OOM at a smaller batch)" in capsys.readouterr().out


def test_providers_switches_and_an_unavailable_float8(tmp_path, monkeypatch, load_bench):
    monkeypatch.setenv("OLAVLM_RESULTS_DIR", str(tmp_path))
    bench = load_bench("bench_step")
    # Run order whatever the order given; aliases; the CPU default leaves compiling out.
    assert bench.parse_providers("fused_cached_float8,fused,seed") == [
        "seed", "fused_cached", "fused_cached_float8"]
    assert bench.parse_providers("all") == list(bench.PROVIDERS)
    assert "fused_cached_compile" not in bench.parse_providers(None)
    with pytest.raises(ValueError, match="unknown"):
        bench.parse_providers("seed,fastest")
    # Checkpointing is undone for the next mode: the original blocks come back.
    runner = bench.StepBench(bench.PRESETS["tiny"], "cpu")
    blocks = list(runner.model.parts.layers)
    assert "2/4 blocks" in runner.configure(bench.MODES["fused_cached_ac"])
    assert list(runner.model.parts.layers) != blocks
    assert runner.configure(bench.MODES["fused_cached"]) == ""
    assert list(runner.model.parts.layers) == blocks
    # float8 without torchao or on a GPU before sm_89: a recorded row, not a failure.
    monkeypatch.setattr(bench, "float8_unavailable", lambda device: "skipped: no torchao")
    assert bench.main(["--preset", "tiny", "--batch", "2",
                       "--providers", "fused_cached_float8"]) == 0
    rows = list(csv.DictReader((tmp_path / "ola_step.csv").open()))
    assert [(r["provider"], r["note"]) for r in rows] == [
        ("fused_cached_float8", "skipped: no torchao")]
    assert math.isnan(float(rows[0]["ms"]))
    # flash-attn without CUDA (or the package): a recorded row; the switch itself sets the
    # decoder's attention and the next mode undoes it.
    assert bench.main(["--preset", "tiny", "--batch", "2",
                       "--providers", "fused_cached_flash"]) == 0
    rows = list(csv.DictReader((tmp_path / "ola_step.csv").open()))
    assert (rows[-1]["provider"], rows[-1]["note"]) == (
        "fused_cached_flash", "skipped: flash-attn needs a CUDA GPU")
    assert "fused_cached_flash" not in bench.parse_providers(None)
    llm_config = runner.model.llm.config
    monkeypatch.setattr(type(runner.model.llm), "set_attn_implementation",
                        lambda self, name: setattr(llm_config, "_attn_implementation", name))
    assert "flash_attention_2" in runner.configure(bench.MODES["fused_cached_flash"])
    assert llm_config._attn_implementation == "flash_attention_2"
    runner.configure(bench.MODES["fused_cached"])
    assert llm_config._attn_implementation == "sdpa"
    # Any other failure of a mode is recorded too, and the run goes on (one GPU window).
    import olavlm.train.parallel as parallel

    def broken(*args):
        raise RuntimeError("float8 broke\nsecond line")

    monkeypatch.setattr(bench, "float8_unavailable", lambda device: "")
    monkeypatch.setattr(parallel, "apply_float8", broken)
    assert bench.main(["--preset", "tiny", "--batch", "2",
                       "--providers", "fused_cached_float8"]) == 0
    rows = list(csv.DictReader((tmp_path / "ola_step.csv").open()))
    assert rows[-1]["note"] == "error: RuntimeError: float8 broke"


def test_side_stream_mode_hands_the_model_waiting_targets_of_the_inline_values(load_bench,
                                                                              monkeypatch):
    # fused_online_side measures what the trainer's teachers.side_stream does: the step gets
    # WaitingTargets (read after the decoder), and on the CPU (no side stream) the same values
    # as the inline mode, so the two modes train on the same targets.
    from olavlm.teachers import base
    from olavlm.teachers.online import WaitingTargets

    monkeypatch.setattr(base, "_WARNED", set())  # (warned once per process: another test's)
    bench = load_bench("bench_step")
    runner = bench.StepBench(bench.PRESETS["tiny"], "cpu")
    batch = runner.batch(2)
    with pytest.warns(UserWarning, match="side_stream=True needs a CUDA device"):
        side = runner.targets(bench.MODES["fused_online_side"], batch)()
    inline = runner.targets(bench.MODES["fused_online"], batch)()
    assert isinstance(side, WaitingTargets)
    assert set(side) == set(inline) == set(batch.targets)
    for task, value in inline.items():
        assert side.shape_of(task) == value.shape
        assert side[task].dtype == value.dtype == batch.targets[task].dtype
        torch.testing.assert_close(side[task], value, rtol=0, atol=0)
    record, step, _ = runner.measure("fused_online_side", batch, warmup=0, rep=1)
    assert step is not None and math.isfinite(record.ms)
    assert "targets=side_stream" in record.note


def test_side_stream_goal_line_reports_the_share_of_the_teachers_hidden(load_bench):
    bench = load_bench("bench_step")

    def rec(provider, ms, peak):
        return bench.common.make_record(
            op="ola_step", provider=provider, mode="fwd_bwd", shape="s", dtype="bfloat16",
            timing=bench.common.Timing(ms, ms, ms, 1), peak_bytes=peak * 2**20)

    ok = {("s", r.provider): r for r in (rec("fused_cached", 300.0, 1000),
                                         rec("fused_online", 380.0, 1200),
                                         rec("fused_online_side", 340.0, 1300))}
    line = bench.side_stream_line(ok, "s")
    assert line.startswith("side stream 340.0 ms against inline 380.0: +40.0 ms saved")
    assert "of the teachers' 80.0 ms inline (50% hidden)" in line
    assert "peak 1300 MiB against 1200" in line
    del ok[("s", "fused_cached")]
    assert "hidden" not in bench.side_stream_line(ok, "s")
    del ok[("s", "fused_online")]
    assert bench.side_stream_line(ok, "s") == ""
