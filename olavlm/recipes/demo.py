# The CPU demo: a tiny random-weight OLA-VLM pre-trained on the built-in synthetic data.
"""``demo``: every part of PT (the real Llama and CLIP classes, projector, task tokens, the
three heads, embedding losses against online teacher targets) at a size that trains on a
laptop CPU in minutes, with nothing downloaded.

Tiny models: ``model.llm = "tiny:llama"`` and ``model.vision_tower = "tiny:clip"`` are not
paths. ``"tiny:<kind>"`` asks the trainer for a random-weight model of the real architecture
at toy widths, built on first use into the run directory: ``olavlm.models.tiny_llm.
build_tiny_llm(kind, ...)`` (kind llama | phi3 | qwen2; 4 decoder layers, hidden size 64, the
tokenizer's vocabulary) and ``olavlm.models.vision.build_tiny_vision_tower(kind, ...)`` (kind
clip | siglip | convnext). Any other value is a local directory.

Data: ``data.path = ""`` is the built-in synthetic dataset (``olavlm data synth``: shape
scenes with exact depth and segmentation maps), generated into ``data.synthetic_dir``.
Targets: the synthetic teacher, online, at a 4 x 4 grid: depth (16, 32), seg (24, 4, 4),
gen (1, 64) (its feature counts 12, 19 and 58 fit in those widths); the heads' target shapes
match. 256 samples / batch 8 = 32 steps an epoch; 300 steps (about 10 epochs) at lr 1e-3 show
every loss falling. Stage ``full``: the tiny LLM is random, so it trains too (frozen, as in
PT, the next-token loss could not fall); everything else is PT. fp32, one process, a checkpoint
every 100 steps.
"""
from __future__ import annotations

from olavlm.config import (
    CheckpointConfig,
    Config,
    DataConfig,
    OptimConfig,
    ParallelConfig,
    TeachersConfig,
    TrainConfig,
)
from olavlm.models.config import HeadConfig, ModelConfig

__all__ = ["demo"]

GRID, DEPTH_DIM, SEG_DIM, GEN_DIM = 4, 32, 24, 64


def demo_heads() -> dict[str, HeadConfig]:
    """SPEC 2.2's head structure at toy widths: gen one query, depth grid**2 queries and the
    three MLPs, seg grid**2 queries against a (C, grid, grid) map."""
    cells = GRID * GRID
    return {
        "gen": HeadConfig(num_queries=1, output_dim=GEN_DIM, target_shape=(1, GEN_DIM),
                          dim_head=8),
        "depth": HeadConfig(num_queries=cells, output_dim=DEPTH_DIM,
                            target_shape=(cells, DEPTH_DIM), num_mlps=3, dim_head=8),
        "seg": HeadConfig(num_queries=cells, output_dim=SEG_DIM,
                          target_shape=(SEG_DIM, GRID, GRID), dim_head=8),
    }


def demo() -> Config:
    return Config(
        recipe="demo",
        model=ModelConfig(llm="tiny:llama", vision_tower="tiny:clip", vision_kind="clip",
                          aux_mode="gen-depth-seg", num_task_tokens=4,
                          layer_indices="d2-4_s1-3_g2-3", loss_weights="d0.5_s0.5_g0.5",
                          contrastive_weight=0.3, heads=demo_heads()),
        data=DataConfig(path="", template="llava_llama_3", batch_size=8, synthetic_num=256,
                        synthetic_size=64, aspect="square"),
        teachers=TeachersConfig(mode="online", names="synthetic",
                                synthetic={"grid": GRID, "depth_dim": DEPTH_DIM,
                                           "seg_dim": SEG_DIM, "gen_dim": GEN_DIM}),
        parallel=ParallelConfig(mixed_precision="fp32", activation_checkpointing="none"),
        optim=OptimConfig(lr=1e-3, weight_decay=0.0, warmup_ratio=0.03, schedule="cosine"),
        train=TrainConfig(stage="full", max_steps=300, epochs=10, device="auto"),
        checkpoint=CheckpointConfig(every_steps=100, keep_last=3),
    )
