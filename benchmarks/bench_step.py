# Benchmark of one OLA-VLM pre-training step (fwd + bwd): the seed's reference path vs the fused.
"""One OLA-VLM pre-training forward + backward, ``set_impl("reference")`` vs ``set_impl("auto")``.

    python benchmarks/bench_step.py --preset llama3_8b --batch 8 --providers reference,fused
    python benchmarks/bench_step.py --preset llama3_2l --batch 8,16   # if the 8B does not fit
    python benchmarks/bench_step.py                # llama3_8b on a GPU, tiny on the CPU
    pytest benchmarks/bench_step.py --benchmark-only   # llama3_8b B=8 on GPU, tiny on CPU

Model (random weights, built directly on the device in bf16: no save/load, no CPU init):
Llama-3-8B-shaped decoder (H=4096, 32 layers, 32 heads / 8 kv heads, I=14336, V=128257),
CLIP ViT-L/14-336 (C=1024, 24 layers, 576 patch tokens, features of block 23 without CLS) as the
frozen vision tower, the mlp2x_gelu projector, 8 task tokens per task and the six heads of
SPEC 2.2 (``default_heads()``, layers "d18-20_s10-18_g12-20"). Pre-training trainability: the
LLM and the tower are frozen (gradients still flow back through every decoder block to the
spliced image features and task tokens); projector, task tokens, heads and logit scales train.
``llama3_2l`` is the same widths with 4 decoder blocks; ``tiny`` is a toy model for CPU runs.

Batch (per sample): ~35 system tokens, the image placeholder (-> 576 image + 24 task tokens),
5 prompt tokens, a caption of 24..36 tokens (right padding) whose tokens alone carry labels:
L = 35 + 600 + 5 + 36 = 676 positions, ~95% of them ignored, as in LLaVA pre-training. Targets
are random bf16 of the teachers' shapes: gen (B, 1, 1024), depth (B, 576, 1024),
seg (B, 1536, 24, 24).

Measured per provider ("reference": the seed's math end to end; "fused": impl="auto"):
- ms: device time of ``loss = model(batch).loss; loss.backward()`` (``common.do_bench``: CUDA
  events, grads set to None untimed before each call; perf_counter on the CPU);
- samples/s = B / step time; tokens/s = real (non-padding) positions of the spliced sequence
  per second;
- peak_mib: allocator peak of one step above what was allocated before it (weights excluded);
- TFLOP/s on the *useful* FLOPs of the step (the same count for both providers, see
  ``step_flops``): decoder GEMMs forward + input-gradient backward (weights frozen: no dW) =
  4 * P_block * tokens per block, causal attention 2 * l^2 * H per sample and block forward and
  2.5x that backward, the LM head on the labelled positions only (fwd + dX: 4 * H * V per
  label), the tower forward only (no grad), the projector 3x its forward, the heads 3x
  ``bench_perceiver.forward_flops``. At llama3_8b B=8 that is ~160 TFLOP, 96% of it decoder.
A CUDA out-of-memory error is recorded as a row with ms = nan and note "OOM".
Rows go to benchmarks/results/ola_step.csv (op "ola_step", mode "fwd_bwd").
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
if not torch.cuda.is_available():  # before triton is imported: kernels run in the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import common  # noqa: E402
from bench_perceiver import Case as HeadCase  # noqa: E402
from bench_perceiver import forward_flops as head_forward_flops  # noqa: E402

from olavlm.models.config import HeadConfig, ModelConfig, default_heads  # noqa: E402
from olavlm.models.ola import IGNORE_INDEX, IMAGE_TOKEN_INDEX, OlaVLM  # noqa: E402

DEVICE = common.bench_device()
OP = "ola_step"
PROVIDERS = ("reference", "fused")
IMPL = {"reference": "reference", "fused": "auto"}

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
                   num_prompt_tokens=2, caption=(4, 8), batches=(2, 4)),
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
    """Useful FLOPs of one fwd + bwd (module docstring); the same for every provider."""
    llm, vis = preset.llm, preset.vision
    h, inter, v = llm["hidden_size"], llm["intermediate_size"], llm["vocab_size"]
    kv = h // llm["num_attention_heads"] * llm["num_key_value_heads"]
    lengths = batch.lengths
    tokens, b = sum(lengths), batch.batch
    n_layers = llm["num_hidden_layers"]
    block = h * (2 * h + 2 * kv) + 3 * h * inter  # q, o, k, v and the gated MLP
    flops = 4 * block * tokens * n_layers  # forward + input gradient (frozen weights)
    flops += int(3.5 * 2 * sum(n * n for n in lengths) * h * n_layers)  # causal attention
    flops += 4 * h * v * batch.num_labels  # LM head: labelled positions only
    c, ni = vis["hidden_size"], model.num_image_tokens
    vt = ni + 1  # + CLS
    num_blocks = vis["num_hidden_layers"] - 1  # hidden_states[-2]
    flops += b * num_blocks * (2 * vt * (4 * c * c + 2 * c * vis["intermediate_size"])
                               + 4 * vt * vt * c)  # tower forward only
    flops += 3 * 2 * b * ni * (c * h + h * h)  # projector
    n_all = len(model.tasks) * model.config.num_task_tokens
    keys = sum(lengths) // b - n_all + model.config.num_task_tokens  # one task's tokens kept
    for task in model.tasks:
        cfg = model.config.heads[task]
        dim = cfg.dim or (h if task == "depth" else cfg.output_dim)
        case = HeadCase(task, b, keys, h, dim, cfg.num_queries, cfg.output_dim)
        flops += 3 * head_forward_flops(case) * len(model.layers[task])
    return flops


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------


def _free(model: OlaVLM, device: str) -> None:
    model.zero_grad(set_to_none=True)
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def _is_oom(err: RuntimeError) -> bool:
    text = str(err)
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in text or \
        "ALLOC_FAILED" in text


def measure(model: OlaVLM, preset: Preset, provider: str, batch: Batch, *, device: str,
            warmup: int, rep: int, extra_note: str = ""):
    """(record, step, setup) of ``provider`` on ``batch``; an OOM gives a record with ms nan
    (and step None)."""
    model.set_impl(IMPL[provider])
    b = batch.batch
    length = batch.input_ids.shape[1] - 1 + model.num_image_tokens + \
        len(model.tasks) * model.config.num_task_tokens
    shape = f"{preset.name}-B{b}-L{length}"

    def setup():
        model.zero_grad(set_to_none=True)

    def step():
        out = model(batch.input_ids, batch.attention_mask, batch.labels, batch.images,
                    batch.image_mask, batch.targets)
        out.loss.backward()

    timing, peak, oom = None, None, ""
    try:
        timing = common.do_bench(step, setup=setup, warmup=warmup, rep=rep, device=device)
        peak = common.peak_memory_delta(step, device=device, setup=setup)
    except RuntimeError as err:  # torch.OutOfMemoryError, or cuBLAS failing to allocate
        if not _is_oom(err):
            raise
        oom = str(err).split("\n")[0][:160]
    _free(model, device)  # outside the except block: its traceback no longer holds tensors
    tokens = sum(batch.lengths)
    if oom:
        nan = float("nan")
        record = common.make_record(op=OP, provider=provider, mode="fwd_bwd", shape=shape,
                                    dtype=preset.dtype, timing=common.Timing(nan, nan, nan, 0),
                                    note=f"OOM: {oom}{extra_note}")
        return record, None, setup
    seconds = timing.median_ms * 1e-3
    note = (f"{b / seconds:.2f} samples/s; {tokens / seconds:.0f} tokens/s; {tokens} tokens; "
            f"impl={IMPL[provider]}{extra_note}")
    record = common.make_record(
        op=OP, provider=provider, mode="fwd_bwd", shape=shape, dtype=preset.dtype,
        timing=timing, num_flops=step_flops(model, preset, batch), peak_bytes=peak, note=note)
    return record, step, setup


def summary_rows(records: list[common.Record], batches: dict[str, Batch]) -> list[dict]:
    """Table rows with samples/s, tokens/s and fused's speedup / memory ratio vs reference."""
    base = {r.shape: r for r in records if r.provider == "reference"}
    rows = []
    for r in records:
        ok = not math.isnan(r.ms)
        b = batches[r.shape].batch
        row = {"shape": r.shape, "provider": r.provider, "ms": r.ms if ok else None,
               "samples_s": b / r.ms * 1e3 if ok else None,
               "tokens_s": sum(batches[r.shape].lengths) / r.ms * 1e3 if ok else None,
               "tflops": r.tflops if ok else None, "peak_mib": r.peak_mib,
               "note": "OOM" if not ok else ""}
        ref = base.get(r.shape)
        if ref is not None and r is not ref and ok and not math.isnan(ref.ms):
            row["speedup"] = f"{ref.ms / r.ms:.2f}x"
            if r.peak_mib and ref.peak_mib:
                row["mem_ratio"] = f"{r.peak_mib / ref.peak_mib:.2f}"
        rows.append(row)
    return rows


TABLE = ("shape", "provider", "ms", "samples_s", "tokens_s", "tflops", "peak_mib", "speedup",
         "mem_ratio", "note")
HEADERS = {"samples_s": "samples/s", "tokens_s": "tokens/s", "tflops": "TFLOP/s",
           "peak_mib": "peak MiB", "mem_ratio": "mem fused/ref"}


# --------------------------------------------------------------------------------------------
# pytest-benchmark entry (llama3_8b B=8 on a GPU, tiny on the CPU; the model is built once)
# --------------------------------------------------------------------------------------------

_MODELS: dict[str, OlaVLM] = {}


def _cached_model(name: str) -> OlaVLM:
    if name not in _MODELS:
        _MODELS.clear()
        _MODELS[name] = build_model(PRESETS[name], DEVICE)[0]
    return _MODELS[name]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_ola_step(benchmark, request, provider):
    from conftest import bench_preset  # noqa: PLC0415

    preset = PRESETS["llama3_8b" if bench_preset(request.config) == "full" else "tiny"]
    model = _cached_model(preset.name)
    batch = make_batch(model, preset, preset.batches[0], DEVICE)
    warmup, rep = common.bench_reps((2, 5))
    record, step, setup = measure(model, preset, provider, batch, device=DEVICE, warmup=warmup,
                                  rep=rep)
    if step is None:
        common.append_records([record])
        pytest.skip(record.note)
    common.finish_pytest_benchmark(benchmark, record, step, setup, rep,
                                   fields=("ms", "tflops", "peak_mib", "note"))


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default=default_preset(),
                        help="model shapes (default: llama3_8b with CUDA, else tiny)")
    parser.add_argument("--batch", default=None,
                        help="batch sizes, comma-separated, or 'all' for the preset's list "
                             "(default: the preset's first, 8 on the GPU presets)")
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--warmup", type=int, default=None, help="default 2 (GPU), 0 (CPU)")
    parser.add_argument("--rep", type=int, default=None, help="default 5 (GPU), 1 (CPU)")
    args = parser.parse_args(argv)
    args.providers = [p for p in args.providers.split(",") if p]
    unknown = sorted(set(args.providers) - set(PROVIDERS))
    if unknown or not args.providers:
        parser.error(f"--providers: unknown {unknown}; choose from {PROVIDERS}")
    preset = PRESETS[args.preset]
    if args.batch is None:
        args.batch = [preset.batches[0]]
    elif args.batch == "all":
        args.batch = list(preset.batches)
    else:
        try:
            args.batch = [int(b) for b in args.batch.split(",") if b]
        except ValueError:
            parser.error(f"--batch must be integers separated by commas or 'all', got "
                         f"{args.batch!r}")
        if not args.batch or min(args.batch) < 1:
            parser.error(f"--batch sizes must be >= 1, got {args.batch}")
    warmup, rep = common.bench_reps((2, 5))
    args.warmup = warmup if args.warmup is None else args.warmup
    args.rep = rep if args.rep is None else args.rep
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    preset = PRESETS[args.preset]
    t0 = time.perf_counter()
    model, seconds = build_model(preset, DEVICE)
    built = ", ".join(f"{k} {v:.1f}s" for k, v in seconds.items())
    weights = ""
    if DEVICE == "cuda":
        weights = f"; {torch.cuda.memory_allocated() / 2**30:.1f} GiB allocated"
    print(f"[{preset.name}] built on {DEVICE} in {time.perf_counter() - t0:.1f}s ({built})"
          f"{weights}", flush=True)
    print(f"[{preset.name}] {trainable_summary(model)}", flush=True)
    records, batches, failed = [], {}, set()
    for b in sorted(args.batch):
        batch = make_batch(model, preset, b, DEVICE)
        for provider in args.providers:
            if provider in failed:  # it ran out of memory at a smaller batch
                print(f"[{preset.name}] B={b} {provider}: skipped (OOM at a smaller batch)")
                continue
            t1 = time.perf_counter()
            record, _, _ = measure(model, preset, provider, batch, device=DEVICE,
                                   warmup=args.warmup, rep=args.rep,
                                   extra_note=f"; build {seconds['llm']:.1f}s")
            batches[record.shape] = batch
            common.append_records([record])  # now: a later timeout keeps what was measured
            records.append(record)
            if math.isnan(record.ms):
                failed.add(provider)
            print(f"[{preset.name}] B={b} {provider}: {record.ms:.1f} ms, "
                  f"{time.perf_counter() - t1:.1f}s wall ({record.note})", flush=True)
    print(common.format_table(summary_rows(records, batches), TABLE, HEADERS))
    print("goal (issue): fused >= 1.5x the reference's samples/s at <= 0.70x its peak memory")
    print(f"total {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
