# Metrics accounting against independent counts: FLOPs from the models' own Linear modules, the
# peak the MFU divides by, TensorBoard after a resume, plots and summaries of odd runs.
from __future__ import annotations

import json
import sys
import types
import warnings

import pytest
import torch
from trainhelpers import demo_overrides

import olavlm.train.trainer as trainer_mod
from olavlm.config import resolve_config
from olavlm.train.metrics import (
    MetricsLogger,
    flops_per_token,
    llm_matmul_params,
    peak_flops_for_name,
    plot_losses,
    summarize_run,
)
from olavlm.train.trainer import Trainer


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("synthetic")




def _configs():
    from transformers import LlamaConfig, Phi3Config, Qwen2Config

    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return {  # real sizes (built on the meta device) and tiny ones; GQA, fused qkv, qkv bias
        "llama3_8b": LlamaConfig(hidden_size=4096, intermediate_size=14336,
                                 num_hidden_layers=32, num_attention_heads=32,
                                 num_key_value_heads=8, vocab_size=128256),
        "phi3_mini": Phi3Config(hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=32,
                                vocab_size=32064),
        "qwen2_0.5b_tied": Qwen2Config(hidden_size=896, intermediate_size=4864,
                                       num_hidden_layers=24, num_attention_heads=14,
                                       num_key_value_heads=2, vocab_size=151936,
                                       tie_word_embeddings=True),
        "llama_tiny_head_dim": LlamaConfig(hidden_size=64, intermediate_size=96,
                                           num_hidden_layers=2, num_attention_heads=4,
                                           num_key_value_heads=2, head_dim=32, vocab_size=300,
                                           **ids),
        "phi3_tiny_gqa": Phi3Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2,
                                    vocab_size=300, **ids),
    }


@pytest.mark.parametrize("name", list(_configs()))
def test_flops_count_the_models_own_linear_modules(name):
    """N (and the frozen / supervised split of flops_per_token) from the nn.Linear weights of
    the model transformers builds for the config: Phi-3's fused qkv / gate_up, Qwen2's tied
    head, head_dim != hidden / heads."""
    from transformers import AutoModelForCausalLM

    cfg = _configs()[name]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    head = model.get_output_embeddings().weight.numel()
    body = sum(m.weight.numel() for m in linears) - head
    assert llm_matmul_params(cfg) == body + head
    # Attention of one layer, forward, summed query by query (causal: query i sees i keys):
    # scores and values, 2 FLOPs per multiply-add, every query head.
    attn = model.model.layers[0].self_attn
    q_dim = attn.config.num_attention_heads * attn.head_dim
    lengths = [5, 11]
    fwd = sum(2 * 2 * q_dim * i for n in lengths for i in range(1, n + 1))
    tokens, seq = sum(lengths), sum(n * n for n in lengths) / sum(lengths)
    attention = 3 * fwd * cfg.num_hidden_layers / tokens  # x3 with backward
    # The formula counts l^2 / 2 key positions per sample, the exact count l (l + 1) / 2:
    # 2 q_dim l FLOPs less per sample and layer forward, x3 with backward.
    diagonal = 6 * q_dim * cfg.num_hidden_layers
    got = flops_per_token(cfg, seq_len=seq, weights_trainable=False, supervised_fraction=0.25)
    assert got == pytest.approx(4 * (body + head / 4) + attention - diagonal, rel=1e-12)
    assert flops_per_token(cfg, seq_len=seq) == pytest.approx(
        6 * (body + head) + attention - diagonal, rel=1e-12)


def test_peak_names_match_whole_model_numbers():
    """"A100" must not match an RTX A1000 (it reported an A100's 312 TFLOP/s: MFU ~30x off);
    GH200 is an H200/H100 (989), the A100 variants stay A100s."""
    assert peak_flops_for_name("NVIDIA RTX A1000 6GB Laptop GPU") is None
    assert peak_flops_for_name("NVIDIA RTX A1000") is None
    assert peak_flops_for_name("NVIDIA A100 80GB PCIe") == 312e12
    assert peak_flops_for_name("NVIDIA A100-SXM4-40GB") == 312e12
    assert peak_flops_for_name("NVIDIA GH200 480GB") == 989e12
    assert peak_flops_for_name("NVIDIA H200 NVL") == 835.5e12
    assert peak_flops_for_name("AMD Instinct MI300X VF") == 1307.4e12


def test_the_mfu_peak_is_the_llms_compute_precision(tmp_path, synth_dir, monkeypatch):
    """model.dtype=bfloat16 on one device without FSDP computes in bf16, while
    parallel.mixed_precision keeps its default fp32: the peak was the fp32/TF32 one (an H100's
    494.5 TFLOP/s for bf16 GEMMs: the logged MFU doubled)."""
    asked = []
    monkeypatch.setattr(trainer_mod, "peak_flops",
                        lambda device, precision, tf32=False: asked.append(precision) or 1e12)
    trainer = Trainer(resolve_config("demo", None, demo_overrides(
        tmp_path, synth_dir, "model.dtype=bfloat16", "train.max_steps=1",
        "checkpoint.every_steps=0", "checkpoint.at_end=false")))
    try:
        assert "fsdp" not in trainer.parallel_done
        assert trainer.cfg.parallel.mixed_precision == "fp32"
        trainer.train()
    finally:
        trainer.close()
    assert [str(p).removeprefix("torch.") for p in asked] == ["bfloat16"]


class _FakeWriter:
    made: list = []

    def __init__(self, log_dir, purge_step=None):
        self.made.append({"log_dir": log_dir, "purge_step": purge_step})

    def add_text(self, *args):
        pass

    def add_scalar(self, *args):
        pass

    def close(self):
        pass


def test_tensorboard_hides_the_steps_a_resume_runs_again(tmp_path, synth_dir, monkeypatch):
    """A resumed run re-logs the steps after its checkpoint; TensorBoard drew both the crashed
    run's and the new values (read_metrics keeps the new ones): purge_step hides the old."""
    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = _FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    _FakeWriter.made = []
    MetricsLogger(tmp_path / "a", total_steps=9, progress=False, tensorboard=True).close()
    MetricsLogger(tmp_path / "b", total_steps=9, progress=False, tensorboard=True,
                  start_step=4).close()
    assert [m["purge_step"] for m in _FakeWriter.made] == [None, 5]
    # The trainer passes the step it resumed at.
    base = demo_overrides(tmp_path, synth_dir, "train.run_name=tb", "checkpoint.every_steps=0",
                      "logging.tensorboard=true")
    first = Trainer(resolve_config("demo", None, [*base, "train.max_steps=2"]))
    try:
        first.train()
    finally:
        first.close()
    second = Trainer(resolve_config("demo", None, [*base, "train.max_steps=3"]))
    second.close()
    assert second.step == 2
    assert [m["purge_step"] for m in _FakeWriter.made[2:]] == [None, 3]


def _write(run_dir, rows):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_plot_and_summary_of_a_diverged_and_a_one_step_run(tmp_path):
    """A panel whose keys are all null (non-finite) is left out instead of drawn empty (with
    matplotlib's no-legend warning); a run with only null losses has nothing to plot; one
    logged step reports no change (it said "up 0.0%")."""
    pytest.importorskip("matplotlib")
    rows = [{"step": s, "time": float(s), "loss": 2.0 / s, "ntp": 1.0 / s,
             "gen": None, "gen/L8/smooth_l1": None, "gen/L8/contrastive": float("nan")}
            for s in (1, 2, 3)]
    _write(tmp_path / "diverged_heads", rows)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = plot_losses(tmp_path / "diverged_heads")
    assert out.exists()
    _write(tmp_path / "all_null", [{"step": 1, "time": 1.0, "loss": None, "ntp": None}])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="no loss values"):
            plot_losses(tmp_path / "all_null")
    _write(tmp_path / "one", [{"step": 1, "time": 1.0, "loss": 2.5, "ntp": 2.0}])
    text = summarize_run(tmp_path / "one")
    assert "loss  2.5 -> 2.5" in text and "%" not in text, text


def test_logged_tensors_keep_their_value(tmp_path):
    """Tensor scalars were read through float32: an int64 count above 2**24 or a float64
    value came back rounded (123456789 -> 123456792)."""
    with MetricsLogger(tmp_path, total_steps=1, progress=False) as log:
        got = log.log(1, {"tokens": torch.tensor(123_456_789), "lr": torch.tensor(
            0.1, dtype=torch.float64), "loss": torch.tensor(2.5), "bad": torch.tensor(
            float("inf"))})
    assert got == {"tokens": 123_456_789, "lr": 0.1, "loss": 2.5, "bad": None}
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert row["tokens"] == 123_456_789 and row["lr"] == 0.1
