# The OLA-VLM model's configuration: tasks, layer taps, heads, loss weights (SPEC 1.5, 1.6, 2.2).
"""Typed configuration of :class:`olavlm.models.OlaVLM` and the parsers of the seed's strings.

Tasks are ``gen``, ``depth`` and ``seg`` (SPEC section 0). ``aux_mode`` ("gen-depth-seg") orders
their task tokens in the sequence. ``layer_indices`` picks, per task, the decoder layers whose
hidden states feed a head: the seed's string ("d18-20_s10-18_g12-20") or a mapping
{"depth": [18, 20], ...}. Layers are 1-based decoder blocks; 0 means the final normed hidden
state (what the seed's string gives for a task it does not name).
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

__all__ = [
    "TASKS",
    "TASK_LETTERS",
    "HeadConfig",
    "ModelConfig",
    "default_heads",
    "parse_aux_mode",
    "parse_layer_indices",
    "parse_loss_weights",
]

TASKS = ("gen", "depth", "seg")
TASK_LETTERS = {"g": "gen", "d": "depth", "s": "seg"}
IMPLS = ("auto", "triton", "torch", "reference")
# The decoder's attention (Hugging Face's attn_implementation): PyTorch's SDPA (its flash
# kernel needs no mask: right-padded rows run without one), the eager matmuls, or the
# flash-attn package's kernels (installed by the user; varlen where a padding mask is needed).
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")


@dataclass
class HeadConfig:
    """One task's embedding-predictor head (SPEC 2.2); one head per tapped layer.

    dim: the resampler's width; None means output_dim, except for depth where the seed uses
    the LLM's hidden size (resolved by the model). num_mlps: 3 for the seed's depth head
    (linear_{1,2,3}; only linear_1 feeds the loss), else 0. target_shape: the teacher's target
    per sample, used to check the batch's targets and to align layouts (seg's (C, h, w) map is
    compared with the head's (h*w, C) tokens by transposing the target once per step).
    """

    num_queries: int
    output_dim: int
    target_shape: tuple[int, ...]
    dim: int | None = None
    depth: int = 1
    dim_head: int = 32
    heads: int = 4
    ff_mult: int = 1
    num_mlps: int = 0


def _check_head_layout(task: str, head: HeadConfig) -> None:
    """The head predicts (num_queries, output_dim) per sample; its target must be that, or a
    (output_dim, h, w) map with h * w = num_queries (seg's, compared transposed)."""
    pred, target = (head.num_queries, head.output_dim), tuple(head.target_shape)
    if target == pred or (len(target) == 3 and target[0] == head.output_dim
                          and target[1] * target[2] == head.num_queries):
        return
    raise ValueError(f"ModelConfig.heads[{task!r}] predicts {pred} per sample, which "
                     f"target_shape {target} cannot be compared with: the target must be "
                     "(num_queries, output_dim), or (output_dim, h, w) with h * w = num_queries")


def default_heads() -> dict[str, HeadConfig]:
    """SPEC 2.2's pre-training heads: gen (1 x 1024), depth (576 x 1024, dim = H),
    seg (576 x 1536)."""
    return {
        "gen": HeadConfig(num_queries=1, output_dim=1024, target_shape=(1, 1024)),
        "depth": HeadConfig(num_queries=576, output_dim=1024, target_shape=(576, 1024),
                            num_mlps=3),
        "seg": HeadConfig(num_queries=576, output_dim=1536, target_shape=(1536, 24, 24)),
    }


@dataclass
class ModelConfig:
    """Everything that defines the model (paths are local directories; nothing is downloaded).

    llm: a Hugging Face causal decoder directory (Llama, Phi-3, Qwen2, ...).
    vision_tower: a vision tower directory (CLIP / SigLIP HF directory, open_clip ConvNeXt);
        vision_kind: "clip" | "convnext" | "siglip" or None to infer it from the path's name.
    aux_mode: task-token order, e.g. "gen-depth-seg"; "" trains no embedding losses.
    num_task_tokens: tokens inserted per task (depth/seg mean-pool their num_queries rows).
    layer_indices: the seed's string or {task: [layers]}; loss_weights: string or {task: w}.
    pass_text_to_aux: the heads also read the text after the task tokens (SPEC 1.6).
    seed_compat: the seed's fixed offsets (num_sys_tokens), unmasked padding in the heads and
        its loss arithmetic (mask_mode "seed"), to compare with seed checkpoints.
    dtype: the LLM's parameter dtype as loaded. trainable_dtype: the projector's, task tokens',
        heads' and logit scales' (None: the LLM's). Pre-training keeps a frozen LLM in bf16 (half
        the memory) and the parts it trains in fp32, so the optimizer updates fp32 weights.
    lean_mlp: the decoder's SwiGLU MLPs save 2 of their 3 activations (lean_mlp.py); off on
        the reference path.
    lean_norm: the decoder's RMSNorms save their input instead of an fp32 copy and run torch's
        fused kernels on GPUs (lean_norm.py); off on the reference path.
    fused_rope: the decoder's attention applies RoPE with olakernels.rotary_embedding (one
        fused pass each way, fused_rope.py); off on the reference path.
    impl: "auto" | "triton" | "torch" | "reference" for every op; "reference" runs the seed's
        math end to end (per-sample splice loop, output_hidden_states, full logits): the oracle.
    """

    llm: str = ""
    vision_tower: str = ""
    vision_kind: str | None = None
    vision_select_layer: int = -2
    projector: str = "mlp2x_gelu"
    aux_mode: str = "gen-depth-seg"
    num_task_tokens: int = 8
    layer_indices: str | dict = "d18-20_s10-18_g12-20"
    loss_weights: str | dict = "d0.5_s0.5_g0.5"
    contrastive_weight: float = 0.3
    smooth_l1_beta: float = 1.0
    logit_scale_init: float = 2.0
    heads: dict = field(default_factory=default_heads)
    pass_text_to_aux: bool = True
    seed_compat: bool = False
    num_sys_tokens: int | None = None
    max_length: int = 4096
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    lean_mlp: bool = True
    lean_norm: bool = True
    fused_rope: bool = True
    trainable_dtype: str | None = None
    impl: str = "auto"

    def __post_init__(self) -> None:
        self.heads = {task: (h if isinstance(h, HeadConfig) else HeadConfig(**h))
                      for task, h in self.heads.items()}
        if self.impl not in IMPLS:
            raise ValueError(f"ModelConfig.impl must be one of {IMPLS}, got {self.impl!r}")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"ModelConfig.attn_implementation must be one of "
                             f"{ATTN_IMPLEMENTATIONS}, got {self.attn_implementation!r}")
        if self.num_task_tokens < (1 if self.tasks else 0):
            raise ValueError(
                f"ModelConfig.num_task_tokens must be >= 1 when aux_mode names tasks "
                f"({self.aux_mode!r}), got {self.num_task_tokens}: the heads read their task "
                "tokens (the seed's num_task_tokens=0 heads, plain resamplers with learned "
                "latents, are not implemented)")
        if not isinstance(self.max_length, int) or self.max_length < 1:
            raise ValueError(f"ModelConfig.max_length must be an integer >= 1 (the longest "
                             f"spliced sequence), got {self.max_length!r}")
        for name in ("dtype", "trainable_dtype"):
            value = getattr(self, name)
            if value not in ("float32", "bfloat16", "float16") and \
                    not (name == "trainable_dtype" and value is None):
                raise ValueError(f"ModelConfig.{name} must be float32, bfloat16 or float16, "
                                 f"got {value!r}")
        for task in self.tasks:
            if task not in self.heads:
                raise ValueError(f"ModelConfig.heads has no entry for task {task!r} of aux_mode "
                                 f"{self.aux_mode!r}; it has {sorted(self.heads)}")
            head = self.heads[task]
            _check_head_layout(task, head)
            if task in ("depth", "seg") and self.num_task_tokens and \
                    head.num_queries % self.num_task_tokens:
                raise ValueError(
                    f"ModelConfig.heads[{task!r}].num_queries ({head.num_queries}) must be a "
                    f"multiple of num_task_tokens ({self.num_task_tokens}): the inserted tokens "
                    "are means of equal groups of the task-token parameter (SPEC 1.5)")
        if self.seed_compat and self.num_sys_tokens is None:
            raise ValueError("ModelConfig.seed_compat=True needs num_sys_tokens (the seed's fixed "
                             "image offset, e.g. 38 for Llama-3, 13 for Phi-3)")
        parse_layer_indices(self.layer_indices, self.tasks)  # raise on a bad spec now
        parse_loss_weights(self.loss_weights, self.tasks)

    @property
    def tasks(self) -> tuple[str, ...]:
        return parse_aux_mode(self.aux_mode)

    @property
    def layers_per_task(self) -> dict[str, list[int]]:
        return parse_layer_indices(self.layer_indices, self.tasks)

    @property
    def weights_per_task(self) -> dict[str, float]:
        return parse_loss_weights(self.loss_weights, self.tasks)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"ModelConfig: unknown keys {unknown}; valid keys are {sorted(known)}")
        values = dict(data)
        if "heads" in values:
            values["heads"] = {t: _head_from_dict(t, h) if isinstance(h, Mapping) else h
                               for t, h in values["heads"].items()}
        return cls(**values)


def _head_from_dict(task: str, data: Mapping) -> HeadConfig:
    """A ``heads`` entry of a saved config: unknown or missing fields named, not a bare
    KeyError/TypeError."""
    fields = {f.name: f for f in dataclasses.fields(HeadConfig)}
    unknown = sorted(set(data) - set(fields))
    required = sorted(n for n, f in fields.items() if f.default is dataclasses.MISSING
                      and f.default_factory is dataclasses.MISSING and n not in data)
    if unknown or required:
        parts = ([f"unknown fields {unknown}"] if unknown else []) + \
            ([f"missing fields {required}"] if required else [])
        raise ValueError(f"ModelConfig: heads[{task!r}]: {'; '.join(parts)}; a head has the "
                         f"fields {sorted(fields)}")
    return HeadConfig(**{**data, "target_shape": tuple(data["target_shape"])})


def parse_aux_mode(aux_mode: str) -> tuple[str, ...]:
    """"gen-depth-seg" -> ("gen", "depth", "seg"); "" -> () (no embedding losses)."""
    if not isinstance(aux_mode, str):
        raise TypeError(f"aux_mode must be a string like 'gen-depth-seg', got {aux_mode!r}")
    tasks = tuple(t for t in aux_mode.split("-") if t)
    for t in tasks:
        if t not in TASKS:
            raise ValueError(f"aux_mode {aux_mode!r}: unknown task {t!r}; tasks are {TASKS}")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"aux_mode {aux_mode!r} names a task twice")
    return tasks


_LAYER_ITEM = re.compile(r"[a-zA-Z]\d+(?:-\d+)?")


def parse_layer_indices(spec: str | Mapping[str, Sequence[int]],
                        tasks: Sequence[str] = TASKS) -> dict[str, list[int]]:
    """Layers (1-based; 0 = final normed state) per task.

    The seed's string keeps at most two numbers per task and means *those two layers*, not a
    range: "d18-20" is layers 18 and 20 (SPEC 1.6). A task the string does not name gets [0],
    the seed's fallback (its index -1: the last, normed, hidden state). A mapping is taken as
    given: {"depth": [18, 20], "seg": [10, 14, 18]}.
    """
    out: dict[str, list[int]] = {}
    if isinstance(spec, str):
        items = _LAYER_ITEM.findall(spec)
        leftover = _LAYER_ITEM.sub("", spec).replace("_", "")
        if leftover:
            raise ValueError(f"layer_indices {spec!r}: cannot parse {leftover!r}; expected items "
                             "like 'd18-20_s10-18_g12-20' (letter d/s/g, then layers)")
        for item in items:
            letter = item[0].lower()
            if letter not in TASK_LETTERS:
                raise ValueError(f"layer_indices {spec!r}: unknown task letter {item[0]!r}; "
                                 f"letters are {sorted(TASK_LETTERS)}")
            task = TASK_LETTERS[letter]
            if task in out:
                raise ValueError(f"layer_indices {spec!r} names task {task!r} twice")
            out[task] = _distinct_layers(spec, task, [int(n) for n in item[1:].split("-")])
        return {t: out.get(t, [0]) for t in tasks}
    if isinstance(spec, Mapping):
        for task, layers in spec.items():
            if task not in TASKS:
                raise ValueError(f"layer_indices: unknown task {task!r}; tasks are {TASKS}")
            layers = [layers] if isinstance(layers, int) else list(layers)
            if not layers or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                     for n in layers):
                raise ValueError(f"layer_indices[{task!r}] must be a non-empty list of layer "
                                 f"numbers >= 0 (1-based blocks, 0 = final), got {layers!r}")
            out[task] = _distinct_layers(spec, task, layers)
        missing = [t for t in tasks if t not in out]
        if missing:
            raise ValueError(f"layer_indices has no layers for tasks {missing} of aux_mode")
        return {t: out[t] for t in tasks}
    raise TypeError(f"layer_indices must be a string or a mapping, got {type(spec).__name__}")


def _distinct_layers(spec, task: str, layers: list[int]) -> list[int]:
    # A layer named twice would build two heads on the same hidden states while the losses,
    # predictions and checkpoints are keyed by layer: one head would silently vanish.
    if len(set(layers)) != len(layers):
        raise ValueError(f"layer_indices {spec!r}: task {task!r} names a layer twice "
                         f"({layers}); give each layer once")
    return layers


_WEIGHT_ITEM = re.compile(r"([a-zA-Z])(\d+\.\d+)")


def parse_loss_weights(spec: str | Mapping[str, float],
                       tasks: Sequence[str] = TASKS) -> dict[str, float]:
    """Per-task loss weights: "d0.5_s0.5_g0.5" (a weight needs a decimal point, as in the seed;
    a task not named gets 0.5) or a mapping {task: weight}."""
    if isinstance(spec, str):
        out = {}
        for letter, value in _WEIGHT_ITEM.findall(spec):
            if letter.lower() not in TASK_LETTERS:
                raise ValueError(f"loss_weights {spec!r}: unknown task letter {letter!r}; "
                                 f"letters are {sorted(TASK_LETTERS)}")
            out[TASK_LETTERS[letter.lower()]] = float(value)
        leftover = _WEIGHT_ITEM.sub("", spec).replace("_", "")
        if leftover:
            raise ValueError(f"loss_weights {spec!r}: cannot parse {leftover!r}; expected items "
                             "like 'd0.5_s0.5_g0.5' (a weight needs a decimal point)")
        return {t: out.get(t, 0.5) for t in tasks}
    if isinstance(spec, Mapping):
        for task, w in spec.items():
            if task not in TASKS:
                raise ValueError(f"loss_weights: unknown task {task!r}; tasks are {TASKS}")
            if not isinstance(w, (int, float)) or isinstance(w, bool) or w < 0:
                raise ValueError(f"loss_weights[{task!r}] must be a number >= 0, got {w!r}")
        return {t: float(spec.get(t, 0.5)) for t in tasks}
    raise TypeError(f"loss_weights must be a string or a mapping, got {type(spec).__name__}")
