# Metrics: FLOPs per token, peaks, StepTimer, the JSONL logger, plots, the run summary.
from __future__ import annotations

import json
import math
import sys
import types
from types import SimpleNamespace

import pytest
import torch

from olavlm.train import metrics as M
from olavlm.train.checkpoint import Checkpointer
from olavlm.train.metrics import (
    MetricsLogger,
    StepTimer,
    flops_per_token,
    llm_matmul_params,
    mfu,
    peak_flops,
    peak_flops_for_name,
    plot_losses,
    read_metrics,
    summarize_run,
)

# L=2 layers, d=8, f=20 (SwiGLU), 4 query heads of 2 dims, 2 kv heads, V=50.
TINY = SimpleNamespace(num_hidden_layers=2, hidden_size=8, intermediate_size=20,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=50,
                       model_type="llama")


def test_flops_per_token_by_hand():
    # q: 8x8, k: 8x4, v: 8x4, o: 8x8 -> 192; MLP: 3 * 8 * 20 = 480; per layer 672.
    n = 2 * 672 + 8 * 50
    assert llm_matmul_params(TINY) == n == 1744
    attention = 6 * 2 * 4 * 2 * 16  # causal: 6 L h d_h T with T = 16
    assert flops_per_token(TINY, seq_len=16) == 6 * n + attention
    assert flops_per_token(TINY, seq_len=16, weights_trainable=False) == 4 * n + attention
    assert flops_per_token(TINY, seq_len=16, trainable_fraction=0.5) == 5 * n + attention
    # The LM head (8 x 50) runs on the labelled tokens only: a quarter of them here.
    body, head = 2 * 672, 8 * 50
    assert flops_per_token(TINY, seq_len=16, weights_trainable=False,
                           supervised_fraction=0.25) == 4 * (body + head / 4) + attention
    with pytest.raises(ValueError, match="supervised_fraction"):
        flops_per_token(TINY, seq_len=4, supervised_fraction=1.5)
    # A real HF config object and a multimodal wrapper with text_config give the same.
    from transformers import LlamaConfig

    hf = LlamaConfig(num_hidden_layers=2, hidden_size=8, intermediate_size=20,
                     num_attention_heads=4, num_key_value_heads=2, vocab_size=50)
    assert flops_per_token(hf, seq_len=16) == 6 * n + attention
    assert flops_per_token(SimpleNamespace(text_config=hf), seq_len=16) == 6 * n + attention
    gpt2_like = SimpleNamespace(**{**vars(TINY), "model_type": "gpt2"})
    assert llm_matmul_params(gpt2_like) == n - 2 * 8 * 20
    with pytest.raises(ValueError, match="intermediate_size"):
        flops_per_token(SimpleNamespace(num_hidden_layers=2), seq_len=4)
    with pytest.raises(ValueError, match="trainable_fraction"):
        flops_per_token(TINY, seq_len=4, trainable_fraction=2)


def test_peak_flops_table_and_mfu():
    assert peak_flops_for_name("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_for_name("NVIDIA H100 PCIe", "bf16") == 756e12
    assert peak_flops_for_name("NVIDIA H200", torch.bfloat16) == 989e12
    assert peak_flops_for_name("NVIDIA H100 NVL") == peak_flops_for_name("NVIDIA H200 NVL") \
        == 835.5e12  # the NVL cards: lower clocks than SXM
    assert peak_flops_for_name("NVIDIA A100-SXM4-80GB", "fp16") == 312e12
    assert peak_flops_for_name("AMD Instinct MI300X") == 1307.4e12
    assert peak_flops_for_name("NVIDIA H100 80GB HBM3", "fp32") == 66.9e12
    assert peak_flops_for_name("NVIDIA H100 80GB HBM3", "fp32", tf32=True) == 494.5e12
    assert peak_flops_for_name("NVIDIA GeForce RTX 4090") is None
    assert peak_flops("cpu") is None and peak_flops(torch.device("cpu"), "fp32") is None
    with pytest.raises(ValueError, match="precision"):
        peak_flops_for_name("H100", "int8")
    assert mfu(1000.0, 1e9, 1e12, world_size=2) == pytest.approx(0.5)
    assert mfu(1000.0, 1e9, None) is None


def test_step_timer_counts_and_rates(monkeypatch):
    clock = iter([100.0, 102.0, 103.0])
    monkeypatch.setattr(M.time, "perf_counter", lambda: next(clock))
    timer = StepTimer("cpu", world_size=2)
    for _ in range(4):
        timer.add(samples=3, tokens=torch.tensor([10, 15]))  # a device count, read once
        timer.step()
    got = timer.read()
    assert got == {"step_time_s": 0.5, "samples_per_s": 12.0, "tokens_per_s": 100.0}
    timer.add(samples=1, tokens=7)
    timer.step()
    assert timer.read() == {"step_time_s": 1.0, "samples_per_s": 2.0, "tokens_per_s": 14.0}
    assert "peak_rss_gib" in M.memory_stats("cpu")


def test_logger_writes_jsonl_on_rank_0_only(tmp_path, capsys):
    with MetricsLogger(tmp_path, rank=1, total_steps=3) as other:
        assert other.log(1, {"loss": 1.0}) == {}
    assert not (tmp_path / "metrics.jsonl").exists()
    log = MetricsLogger(tmp_path, rank=0, total_steps=3)
    got = log.log(1, {"loss": torch.tensor(2.5), "ntp": torch.tensor(2.0), "lr": 1e-3,
                      "bad": float("nan"), "nonfinite_total": 0})
    assert got == {"loss": 2.5, "ntp": 2.0, "lr": 1e-3, "bad": None, "nonfinite_total": 0}
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["loss"] == 2.5  # flushed before close
    for step in (2, 3):
        log.log(step, {"loss": 2.0 / step, "ntp": 1.0})
    log.close()
    log.close()  # twice is fine
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[0]["bad"] is None
    assert rows[2]["loss"] == pytest.approx(2 / 3) and "time" in rows[0]
    err = capsys.readouterr().err  # plain progress lines when stderr is not a terminal
    assert "step 1/3" in err and "step 3/3 (100%)" in err and "ETA" in err


def test_read_metrics_after_a_resume_and_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    first = [json.dumps({"step": s, "loss": float(s)}) for s in range(1, 7)]
    path.write_text("\n".join(first) + '\n{"step": 7, "lo')  # crashed mid-line at step 7
    with MetricsLogger(tmp_path, total_steps=8, progress=False) as log:  # resumed at step 4
        for s in range(5, 7):
            log.log(s, {"loss": 10.0 * s})
    rows = read_metrics(tmp_path)
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0),
                                                       (5, 50.0), (6, 60.0)]
    assert read_metrics(tmp_path / "nowhere") == []


def test_tensorboard_and_wandb_are_optional(tmp_path, monkeypatch):
    log = MetricsLogger(tmp_path, total_steps=1, progress=False)  # both off by default
    assert log._tb is None and log._wandb is None
    log.close()
    monkeypatch.setitem(sys.modules, "wandb", None)  # "not installed"
    try:
        import tensorboard  # noqa: F401
        has_tb = True
    except ImportError:
        has_tb = False
    with pytest.warns(UserWarning) as caught:
        log = MetricsLogger(tmp_path, total_steps=1, progress=False, tensorboard=not has_tb,
                            wandb=True)
    assert any("wandb is not installed" in str(w.message) for w in caught)
    log.log(1, {"loss": 1.0})
    log.close()


def test_wandb_receives_scalars_offline(tmp_path, monkeypatch):
    calls = []
    fake = types.ModuleType("wandb")

    class Run:
        def log(self, values, step):
            calls.append(("log", values, step))

        def finish(self):
            calls.append(("finish",))

    fake.init = lambda **kw: calls.append(("init", kw)) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    with MetricsLogger(tmp_path, total_steps=2, progress=False, wandb=True,
                       wandb_project="p", config_dict={"a": 1}) as log:
        log.log(2, {"loss": 1.5, "bad": math.inf})
    init = calls[0][1]
    assert init["mode"] == "offline" and init["project"] == "p" and init["config"] == {"a": 1}
    assert init["id"] == (tmp_path / "wandb_id.txt").read_text().strip()
    assert calls[1:] == [("log", {"loss": 1.5}, 2), ("finish",)]


def _synthetic_run(run_dir, steps=60):
    with MetricsLogger(run_dir, total_steps=steps, progress=False) as log:
        for s in range(1, steps + 1):
            decay = math.exp(-s / 20)
            row = {"ntp": 2 + 3 * decay, "gen": 0.5 * decay + 0.1, "depth": 0.4 * decay + 0.05,
                   "seg": 0.3 * decay + 0.05, "gen/L8/smooth_l1": 0.2 * decay + 0.01,
                   "gen/L8/contrastive": 0.8 * decay + 0.1, "lr": 1e-3, "grad_norm": 1.0}
            row["loss"] = row["ntp"] + row["gen"] + row["depth"] + row["seg"]
            log.log(s, row)


def test_plot_losses_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    _synthetic_run(tmp_path)
    out = plot_losses(tmp_path)
    assert out == tmp_path / "losses.png" and out.stat().st_size > 10_000
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    other = plot_losses(tmp_path, tmp_path / "x.png")
    assert other.exists()


def test_plot_losses_without_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    _synthetic_run(tmp_path, steps=3)
    assert plot_losses(tmp_path) is None
    assert "matplotlib is not installed" in capsys.readouterr().err


def test_summarize_run_reports_each_component(tmp_path):
    _synthetic_run(tmp_path)
    Checkpointer(tmp_path).save(60, {"extra": {"step": 60}})
    text = summarize_run(tmp_path)
    for key in ("loss", "ntp", "gen", "depth", "seg", "gen/L8/smooth_l1", "gen/L8/contrastive"):
        line = next(ln for ln in text.splitlines() if ln.strip().startswith(key + " "))
        assert "down" in line, line
    assert "lr " not in text and "grad_norm" not in text
    assert "steps 1..60 (60 logged)" in text and str(tmp_path) in text
    assert "step_000060" in text and "loss plot: none" in text
    assert "no metrics logged" in summarize_run(tmp_path / "empty")
