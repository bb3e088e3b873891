# Typed, nested run configuration of `olavlm train` (model, data, teachers, parallel, ...).
"""The run configuration: one dataclass per concern, nested in :class:`Config`.

Loading (YAML/JSON files, dotted ``key=value`` overrides, type checks, unknown keys rejected
with the valid choices named) lives in the functions at the bottom of this module.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from olavlm.models.config import ModelConfig

__all__ = [
    "CheckpointConfig",
    "Config",
    "DataConfig",
    "LoggingConfig",
    "OptimConfig",
    "ParallelConfig",
    "TeachersConfig",
    "TrainConfig",
]


@dataclass
class DataConfig:
    """path: LLaVA json/jsonl file(s) or a synthetic dataset directory ("" = the built-in
    synthetic dataset, generated under synthetic_dir on first use)."""

    path: str = ""
    image_folder: str | None = None
    tokenizer: str | None = None  # None: the dataset directory's tokenizer/ (synthetic)
    template: str = "llava_llama_3"
    batch_size: int = 8  # per rank, per micro-step
    num_workers: int = 0
    shuffle: bool = True
    group_by_modality_length: bool = False
    aspect: str = "square"  # square (PT) | pad (VPT/IFT), SPEC 1.1
    on_bad_sample: str = "skip"
    synthetic_dir: str = "~/.cache/olavlm/synthetic"
    synthetic_num: int = 512
    synthetic_size: int = 64


@dataclass
class TeachersConfig:
    """mode: "online" (teachers run batched on the training device), "cache" (targets read
    from cache_dir, written by `olavlm targets extract`) or "none" (no embedding losses)."""

    mode: str = "online"
    names: str = "synthetic"  # comma list: synthetic | depth,seg,gen
    weights: dict[str, str] = field(default_factory=dict)  # task -> local model path
    cache_dir: str | None = None
    on_missing_target: str = "mask"
    compile: bool = False
    side_stream: bool = False


@dataclass
class ParallelConfig:
    """fsdp: shard with FSDP2 when more than one process runs ("auto"), always, or never.
    mixed_precision: parameter dtype of the compute ("bf16" | "fp32"); reductions in fp32."""

    fsdp: str = "auto"  # auto | on | off
    backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    mixed_precision: str = "fp32"  # fp32 | bf16
    reduce_dtype: str = "fp32"
    activation_checkpointing: str = "none"  # none | selective | full
    compile: bool = False  # per decoder block
    float8: str = "none"  # none | tensorwise | rowwise (torchao; H100/MI300X)
    tf32: bool = True
    sdpa_backend: str = "auto"  # auto | flash | efficient | cudnn | math
    liger: bool = False  # liger-kernel RMSNorm / SwiGLU / RoPE modules


@dataclass
class OptimConfig:
    lr: float = 1e-3
    projector_lr: float | None = None  # None: lr
    head_lr: float | None = None  # heads, task tokens, logit scales; None: lr
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_ratio: float = 0.03
    schedule: str = "cosine"  # cosine | constant
    grad_clip: float = 1.0
    grad_accum: int = 1
    fused: str = "auto"  # auto | on | off (torch's fused AdamW; apex when installed)


@dataclass
class TrainConfig:
    stage: str = "pt"  # pt | vpt | ift: what is trainable (SPEC 5.1)
    max_steps: int = 200  # optimizer steps; 0: one epoch
    epochs: int = 1
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    output_dir: str = "runs"
    run_name: str | None = None  # None: <recipe>-<timestamp>
    nonfinite_limit: int = 5  # stop after this many non-finite losses in a row


@dataclass
class CheckpointConfig:
    every_steps: int = 100  # 0: only at the end and on SIGTERM/SIGINT
    keep_last: int = 3
    resume: str = "auto"  # auto (latest valid in the run dir) | none | <checkpoint path>
    at_end: bool = True


@dataclass
class LoggingConfig:
    every_steps: int = 1
    progress: bool = True
    jsonl: bool = True
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "olavlm"
    plot: bool = True


@dataclass
class Config:
    recipe: str = "demo"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    teachers: TeachersConfig = field(default_factory=TeachersConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
