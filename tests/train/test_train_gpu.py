# The training job on a GPU: the demo in bf16 through FSDP2 (one rank), Triton kernels compiled.
from __future__ import annotations

import pytest
import torch

from olavlm.config import resolve_config
from olavlm.train.metrics import read_metrics
from olavlm.train.trainer import Trainer


@pytest.mark.gpu
def test_demo_trains_on_gpu_in_bf16(tmp_path):
    cfg = resolve_config("demo", None, [
        f"train.output_dir={tmp_path / 'runs'}", f"data.synthetic_dir={tmp_path / 'synth'}",
        "data.synthetic_num=64", "train.max_steps=40", "train.device=cuda",
        "parallel.mixed_precision=bf16", "checkpoint.every_steps=20", "logging.progress=false"])
    trainer = Trainer(cfg)
    try:
        result = trainer.train()
        rows = read_metrics(result.run_dir)
        assert len(rows) == 40 and rows[-1]["nonfinite_total"] == 0
        first = sum(r["loss"] for r in rows[:5]) / 5
        last = sum(r["loss"] for r in rows[-5:]) / 5
        assert last < first
        assert rows[-1]["peak_mem_gib"] > 0 and "mfu" in rows[-1]
        assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    finally:
        trainer.close()
