# Parts of the OLA-VLM step benchmark: shape presets, the model, the batch and the teachers.
"""What ``bench_step.py`` measures, built on the device: the shape presets (``PRESETS``), the
OLA-VLM with pre-training trainability (``build_model``), one batch (``make_batch``) and its
useful FLOPs (``step_flops``), and the random-weight teachers of the online modes
(``build_teachers``, ``per_image_targets``: the seed's per-image path). bench_step.py's module
docstring describes the model, the batch and the FLOP count; it runs the modes and measures.
"""
from __future__ import annotations

import contextlib
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench_teachers  # noqa: E402
from bench_perceiver import Case as HeadCase  # noqa: E402
from bench_perceiver import forward_flops as head_forward_flops  # noqa: E402

from olavlm.models.config import HeadConfig, ModelConfig, default_heads  # noqa: E402
from olavlm.models.ola import IGNORE_INDEX, IMAGE_TOKEN_INDEX, OlaVLM  # noqa: E402

LLAMA3_8B = dict(vocab_size=128257, hidden_size=4096, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
                 max_position_embeddings=8192, rms_norm_eps=1e-5)  # rope theta: no cost
CLIP_L336 = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                 intermediate_size=4096, image_size=336, patch_size=14)


def _tiny_heads() -> dict[str, HeadConfig]:
    # tests/models/tiny_ola.py's heads: the real structure at toy widths (16 image tokens).
    return {
        "gen": HeadConfig(num_queries=1, output_dim=16, target_shape=(1, 16), dim_head=8),
        "depth": HeadConfig(num_queries=16, output_dim=16, target_shape=(16, 16), num_mlps=3,
                            dim_head=8),
        "seg": HeadConfig(num_queries=16, output_dim=12, target_shape=(12, 4, 4), dim_head=8),
    }


@dataclass(frozen=True)
class Preset:
    name: str
    llm: dict  # LlamaConfig kwargs
    vision: dict  # CLIPVisionConfig kwargs
    layer_indices: str
    heads: dict = field(default_factory=default_heads)
    num_task_tokens: int = 8
    num_sys_tokens: int = 35  # before the image placeholder (Llama-3 template + system prompt)
    num_prompt_tokens: int = 5  # after the image, before the caption
    caption: tuple[int, int] = (24, 36)  # labelled caption length, min and max
    batches: tuple[int, ...] = (8, 16, 32)  # --batch all; larger ones only if memory allows
    dtype: torch.dtype = torch.bfloat16
    teachers: str = "full"  # TEACHERS key: the real sizes, or tiny ones fitting the heads
    photo_size: tuple[int, int] = (640, 480)  # the teachers' input photos, width x height


PRESETS = {
    "llama3_8b": Preset("llama3_8b", LLAMA3_8B, CLIP_L336, "d18-20_s10-18_g12-20"),
    # Same widths, 4 blocks: the 8B's per-layer costs at a fraction of the time and memory.
    # No tap on block 4 (it would read the final state, a path the 8B's taps never take).
    "llama3_2l": Preset("llama3_2l", {**LLAMA3_8B, "num_hidden_layers": 4}, CLIP_L336,
                        "d2-3_s1-3_g2-3"),
    # tiny_llm.build_tiny_llm's default Llama and a 2-block CLIP at 32 px (16 tokens).
    "tiny": Preset("tiny", dict(vocab_size=512, hidden_size=64, num_hidden_layers=4,
                                num_attention_heads=4, num_key_value_heads=2,
                                intermediate_size=128, max_position_embeddings=4096),
                   dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                        intermediate_size=64, image_size=32, patch_size=8),
                   "d2-4_s1-3_g2-3", heads=_tiny_heads(), num_task_tokens=4, num_sys_tokens=6,
                   num_prompt_tokens=2, caption=(4, 8), batches=(2, 4), teachers="tiny",
                   photo_size=(160, 120)),
}


def default_preset() -> str:
    return "llama3_8b" if torch.cuda.is_available() else "tiny"


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(prev)


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class ClipFeatures(nn.Module):
    """Fallback tower (only if olavlm.models.vision cannot wrap an in-memory model): the seed's
    ``hidden_states[-2][:, 1:]`` of a CLIPVisionModel, frozen, under no_grad."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        cfg = model.config
        self.model = model
        self.hidden_size = cfg.hidden_size
        self.image_size = cfg.image_size
        self.num_tokens = (cfg.image_size // cfg.patch_size) ** 2
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):  # frozen: always in eval mode
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        out = self.model(pixel_values=images.to(dtype), output_hidden_states=True)
        return out.hidden_states[-2][:, 1:]


def build_tower(preset: Preset, device: str) -> nn.Module:
    import transformers

    config = transformers.CLIPVisionConfig(**preset.vision)
    with _default_dtype(preset.dtype), torch.device(device):
        clip = transformers.CLIPVisionModel(config)
    try:
        from olavlm.models.vision import ClipVisionTower  # noqa: PLC0415

        return ClipVisionTower(clip, name=f"random-clip-{preset.name}", select_layer=-2,
                               dtype=preset.dtype, device=device)
    except (ImportError, TypeError) as err:  # vision.py without an in-memory constructor
        warnings.warn(f"ClipVisionTower could not wrap an in-memory model ({err}); using the "
                      "benchmark's ClipFeatures adapter", stacklevel=2)
        return ClipFeatures(clip)


def build_model(preset: Preset, device: str) -> tuple[OlaVLM, dict[str, float]]:
    """The OLA-VLM of ``preset`` on ``device`` with pre-training trainability, and the seconds
    each part took to build. Every tensor is created on the device (HF's normal(0, 0.02) init
    runs there: seconds for 8B parameters, where a CPU init takes minutes)."""
    import transformers

    seconds = {}
    torch.manual_seed(0)
    t0 = time.perf_counter()
    config = transformers.LlamaConfig(**preset.llm, tie_word_embeddings=False,
                                      attn_implementation="sdpa")
    with _default_dtype(preset.dtype), torch.device(device):
        llm = transformers.LlamaForCausalLM(config)
    _sync(device)
    seconds["llm"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    tower = build_tower(preset, device)
    _sync(device)
    seconds["tower"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    cfg = ModelConfig(layer_indices=preset.layer_indices, heads=preset.heads,
                      num_task_tokens=preset.num_task_tokens,
                      dtype=str(preset.dtype).removeprefix("torch."), impl="auto")
    # fp32 default dtype here: the logit scales stay fp32 as in a loaded model; OlaVLM casts the
    # projector, task tokens and heads to the LLM's dtype.
    with torch.device(device):
        model = OlaVLM(cfg, llm=llm, vision_tower=tower)
    model.to(device)  # a no-op unless some module made a tensor on an explicit device
    model.llm.requires_grad_(False)  # pre-training: LLM and tower frozen
    model.vision_tower.requires_grad_(False)
    model.train()
    _sync(device)
    seconds["ola"] = time.perf_counter() - t0
    return model, seconds


def _count(n: int) -> str:
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def trainable_summary(model: OlaVLM) -> str:
    """Trainable / total parameters per top-level module (the freezing, logged per module)."""
    parts = []
    for name, module in model.named_children():
        total = sum(p.numel() for p in module.parameters())
        train = sum(p.numel() for p in module.parameters() if p.requires_grad)
        if total:
            parts.append(f"{name} {_count(train)}/{_count(total)}")
    scales = sum(p.numel() for n, p in model.named_parameters(recurse=False) if p.requires_grad)
    parts.append(f"logit scales {scales}")
    return "trainable/total: " + ", ".join(parts)


# --------------------------------------------------------------------------------------------
# Batch and FLOPs
# --------------------------------------------------------------------------------------------


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) int64, the image placeholder at num_sys_tokens
    attention_mask: torch.Tensor  # (B, T) bool, right padding
    labels: torch.Tensor  # (B, T) int64, caption tokens only
    images: torch.Tensor  # (B, 3, S, S)
    image_mask: torch.Tensor  # (B,) int64
    targets: dict[str, torch.Tensor]
    lengths: list[int]  # real positions per sample after the splice (NI + NT - 1 more)
    num_labels: int  # labelled positions (the caption tokens)
    photos: list[torch.Tensor] | None = None  # (3, H, W) uint8 on the host: teachers' input

    @property
    def batch(self) -> int:
        return self.input_ids.shape[0]


def make_batch(model: OlaVLM, preset: Preset, batch: int, device: str, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    lo, hi = preset.caption
    lengths = torch.randint(lo, hi + 1, (batch,), generator=g)
    head = preset.num_sys_tokens + 1 + preset.num_prompt_tokens
    t = head + hi
    ids = torch.randint(1, preset.llm["vocab_size"], (batch, t), generator=g)
    ids[:, preset.num_sys_tokens] = IMAGE_TOKEN_INDEX
    pos = torch.arange(t)
    mask = pos[None, :] < (head + lengths)[:, None]
    labels = torch.where(mask & (pos[None, :] >= head), ids, IGNORE_INDEX)
    ids = ids.masked_fill(~mask, 0)
    size = model.vision_tower.image_size
    images = torch.randn(batch, 3, size, size, generator=g)
    targets = {task: torch.randn((batch, *model.config.heads[task].target_shape), generator=g)
               for task in model.tasks}

    def dev(x):
        return x.to(device=device, dtype=preset.dtype if x.is_floating_point() else None)

    grow = model.num_image_tokens + len(model.tasks) * model.config.num_task_tokens - 1
    return Batch(dev(ids), dev(mask), dev(labels), dev(images),
                 torch.ones(batch, dtype=torch.long, device=device),
                 {k: dev(v) for k, v in targets.items()},
                 [int(n) + grow for n in mask.sum(1).tolist()],
                 int((labels != IGNORE_INDEX).sum()))


def step_flops(model: OlaVLM, preset: Preset, batch: Batch) -> int:
    """Useful FLOPs of one fwd + bwd (bench_step.py's module docstring); the same for
    every provider."""
    llm, vis = preset.llm, preset.vision
    h, inter, v = llm["hidden_size"], llm["intermediate_size"], llm["vocab_size"]
    kv = h // llm["num_attention_heads"] * llm["num_key_value_heads"]
    lengths = batch.lengths
    tokens, b = sum(lengths), batch.batch
    n_layers = llm["num_hidden_layers"]
    block = h * (2 * h + 2 * kv) + 3 * h * inter  # q, o, k, v and the gated MLP
    flops = 4 * block * tokens * n_layers  # forward + input gradient (frozen weights)
    # causal attention: 2 l^2 H forward, 2x that backward (dQ, dK, dV, dP; no recompute)
    flops += 3 * 2 * sum(n * n for n in lengths) * h * n_layers
    flops += 4 * h * v * batch.num_labels  # LM head: labelled positions only
    c, ni = vis["hidden_size"], model.num_image_tokens
    vt = ni + 1  # + CLS
    num_blocks = vis["num_hidden_layers"] - 1  # hidden_states[-2]
    flops += b * num_blocks * (2 * vt * (4 * c * c + 2 * c * vis["intermediate_size"])
                               + 4 * vt * vt * c)  # tower forward only
    # projector: its input (the frozen tower's output) needs no gradient, so the first Linear
    # costs forward + dW (2x), the second forward + dX + dW (3x)
    flops += 2 * b * ni * (2 * c * h + 3 * h * h)
    n_all = len(model.tasks) * model.config.num_task_tokens
    keys = sum(lengths) // b - n_all + model.config.num_task_tokens  # one task's tokens kept
    for task in model.tasks:
        cfg = model.config.heads[task]
        dim = cfg.dim or (h if task == "depth" else cfg.output_dim)
        case = HeadCase(task, b, keys, h, dim, cfg.num_queries, cfg.output_dim)
        flops += 3 * head_forward_flops(case) * len(model.layers[task])
    return flops


# --------------------------------------------------------------------------------------------
# Teachers
# --------------------------------------------------------------------------------------------

# Per teacher: (transformers config kwargs, Teacher kwargs). "full": bench_teachers' real sizes
# at the seed's input sizes; "tiny": toy teachers whose targets have the tiny heads' shapes
# (depth (16, 16), seg (12, 4, 4), gen (1, 16)).
TEACHERS = {
    "full": {name: (bench_teachers.CONFIGS["full"][name], {}) for name in ("depth", "seg", "gen")},
    "tiny": {
        "depth": (dict(hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                       intermediate_size=32, image_size=56, patch_size=14,
                       out_indices=[1, 2, 3, 4], apply_layernorm=True,
                       reshape_hidden_states=False), dict(input_size=56)),
        "seg": (dict(image_size=64, patch_size=4, embed_dim=6, depths=[1, 1], num_heads=[1, 2],
                     window_size=4, out_features=["stage1", "stage2"]),
                dict(input_size=64, seed_view_size=64, grid=4)),
        "gen": (dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                     num_attention_heads=2, image_size=28, patch_size=14, projection_dim=16),
                {}),
    },
}


def build_teachers(preset: Preset, device: str, heads: dict[str, HeadConfig]) -> list:
    """The depth, seg and gen teachers of ``preset.teachers`` with random weights, created on
    ``device`` in the preset's dtype (nothing is downloaded); their targets must fit ``heads``."""
    torch.manual_seed(1)
    teachers = []
    for name in ("depth", "seg", "gen"):
        config, kwargs = TEACHERS[preset.teachers][name]
        teacher = bench_teachers.build_from_config(name, config, device=device,
                                                   dtype=preset.dtype, on_device=True, **kwargs)
        for task, shape in teacher.target_shapes().items():
            if tuple(shape) != tuple(heads[task].target_shape):
                raise ValueError(f"teachers {preset.teachers!r}: the {task} teacher gives "
                                 f"{tuple(shape)}, the heads want "
                                 f"{tuple(heads[task].target_shape)}")
        teachers.append(teacher)
    return teachers


def per_image_targets(teachers: list, photos: list[torch.Tensor], device: str,
                      dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The seed's targets: for each image and teacher, PIL + float32 preprocessing on the
    host, a float32 (pageable) copy and a batch-1 forward; {task: (B, *shape)} in ``dtype``."""
    from PIL import Image  # noqa: PLC0415

    parts: dict[str, list[torch.Tensor]] = {}
    with torch.inference_mode():
        for image in photos:
            pil = Image.fromarray(image.permute(1, 2, 0).numpy())
            for teacher in teachers:
                pixels = bench_teachers.seed_input(teacher, pil).to(device)
                for task, target in teacher.encode(pixels.to(teacher.dtype)).items():
                    parts.setdefault(task, []).append(target)
    # Outside inference mode: cat makes normal tensors, which the losses may save for backward.
    return {task: torch.cat(ts).to(dtype) for task, ts in parts.items()}
