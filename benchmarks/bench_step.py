# Benchmark of one OLA-VLM pre-training step (fwd + bwd): the seed's path vs ours, per switch.
"""One OLA-VLM pre-training forward + backward per mode: the seed-faithful eager step (teachers
online, one image at a time) vs our kernels with online or cached targets and the switches.

    python benchmarks/bench_step.py --preset llama3_8b --batch 8 --providers seed,fused_cached
    python benchmarks/bench_step.py --preset llama3_2l --batch 8,16   # if the 8B does not fit
    python benchmarks/bench_step.py                # all modes, llama3_8b on a GPU, tiny on CPU
    pytest benchmarks/bench_step.py --benchmark-only   # llama3_8b B=8 on GPU, tiny on CPU

Modes (``--providers``, comma-separated or "all"; they run in this order, whatever the order
given, so that the model-changing switches come last):

- ``seed``: the seed-faithful eager step: ``set_impl("reference")`` (eager losses, full-vocab
  logits, per-sample loops) plus the three teachers run inside the step one image at a time,
  as the seed does: per image and teacher, PIL resize and float32 normalization on the host,
  a float32 copy, a batch-1 forward (``bench_teachers.seed_input``); the step trains on them.
- ``fused_cached``: ``set_impl("auto")`` (our kernels) with the targets given, as read from the
  target cache. Records before the modes existed call it ``fused`` (still accepted here).
- ``fused_online``: our kernels, the teachers batched once per step (``OnlineTargets``: uint8
  images copied to the device, resized there, one forward per teacher; inline, no side stream).
- ``fused_online_side``: as ``fused_online`` with the teachers on their own CUDA stream
  (``teachers.side_stream=true`` in ``olavlm train``): submitted before the model's forward,
  read by it after its decoder, so they overlap the vision tower and the LLM forward. Its gain
  over ``fused_online`` is what the side stream is worth (on the CPU it runs inline).
- ``reference``: the seed's math with cached targets (the model issue's baseline).
- ``fused_cached_ac``: + activation checkpointing "selective" (every other block): memory vs
  speed.
- ``fused_cached_liger``: + liger-kernel's RMSNorm and SwiGLU modules (``apply_liger``; CUDA
  only, carry its wheel): SwiGLU saving gate/up only is the next activation-memory lever.
- ``fused_cached_compile``: + ``apply_compile`` (``torch.compile`` per decoder block). Its first
  call is timed on its own and printed as the compile time, then the usual warm-up.
- ``fused_cached_float8``: + ``apply_float8(model, "tensorwise")`` on the decoder Linears, then
  per-block compile as above (torchao's float8 casts are fast only compiled). Needs torchao and
  an sm_89+ GPU (else a row with ms nan and a "skipped" note); on CPU it runs for numerics.
- ``fused_cached_flash``: the decoder's attention through the flash-attn package
  (``set_attn_implementation("flash_attention_2")``, undone for the next mode) instead of
  SDPA. Needs CUDA and flash-attn (else a row with ms nan and a "skipped" note).

The model is built once and reconfigured per mode (impl switch; checkpointing wrapped and
unwrapped); compile, float8 and liger cannot be undone, so a later mode gets a fresh build.
The teachers (random weights at the real sizes: DINOv2-L depth at 336 px, Swin-L seg at 800 px,
CLIP ViT-H/14 gen at 224 px; tiny ones whose targets fit the tiny heads on the tiny preset) are
built directly on the device on first use and dropped after the last online mode. Their input
is B photo-like uint8 images (``bench_teachers.photos``, 640x480; tiny 160x120).

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
L = 35 + 600 + 5 + 36 = 676 positions, ~95% of them ignored, as in LLaVA pre-training. Cached
targets are random bf16 of the teachers' shapes: gen (B, 1, 1024), depth (B, 576, 1024),
seg (B, 1536, 24, 24); the online modes compute them from the photos instead.

Measured per mode:
- ms: device time of ``targets = <mode's targets>; loss = model(batch, targets).loss;
  loss.backward()`` (``common.do_bench``: CUDA events, grads set to None untimed before each
  call; perf_counter on the CPU). The seed's host work (PIL, synchronous pageable copies) is
  timed too: the GPU idles on it between the events, beyond the harness's 2 ms spin;
- samples/s = B / step time; tokens/s = real (non-padding) positions of the spliced sequence
  per second;
- MFU of the LLM part: tokens/s x ``olavlm.train.metrics.flops_per_token(llm config,
  seq_len=sum(l^2)/sum(l), weights_trainable=False, supervised_fraction=labels/tokens)`` /
  ``peak_flops(device, "bf16")`` (causal attention, the LM head on the labelled positions only;
  float8 too is read against the bf16 peak); not reported on CPU;
- peak_mib: allocator peak of one step above what was allocated before it (model and teacher
  weights excluded; teacher activations and outputs included);
- TFLOP/s on the *useful* FLOPs of the step (the same count for every mode, teachers not
  counted, see ``step_flops``): decoder GEMMs forward + input-gradient backward (weights
  frozen: no dW) = 4 * P_block * tokens per block, causal attention 2 * l^2 * H per sample and
  block forward and 2x that backward, the LM head on the labelled positions only (fwd + dX:
  4 * H * V per label), the tower forward only (no grad), the projector's first Linear 2x its
  forward (no input gradient) and its second 3x, the heads 3x
  ``bench_perceiver.forward_flops``. At llama3_8b B=8 that is ~161 TFLOP, ~95% of it in the
  decoder's blocks.
A CUDA out-of-memory error is recorded as a row with ms = nan and note "OOM"; each row is
appended as soon as it is measured (a timeout keeps the finished modes). The table at the end
gives each mode's speedup and memory ratio over ``seed`` and the goals:
training issue (H100): fused_cached >= 3x seed's samples/s, LLM MFU >= 45% (bf16); model
issue: fused_cached >= 1.5x reference's samples/s at <= 0.70x its peak memory.
Rows go to benchmarks/results/ola_step.csv (op "ola_step", mode "fwd_bwd", provider = mode).
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
if not torch.cuda.is_available():  # before triton is imported: kernels run in the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import bench_teachers  # noqa: E402
import common  # noqa: E402
from kernel_breakdown import kernel_breakdown  # noqa: E402
from step_parts import (  # noqa: E402
    PRESETS,
    Batch,
    Preset,
    _sync,
    build_model,
    build_teachers,
    default_preset,
    make_batch,
    per_image_targets,
    step_flops,
    trainable_summary,
)

from olavlm.models.ola import OlaVLM  # noqa: E402
from olavlm.train.metrics import flops_per_token, mfu, peak_flops  # noqa: E402

DEVICE = common.bench_device()
OP = "ola_step"


@dataclass(frozen=True)
class Mode:
    impl: str  # model.set_impl
    # "per_image" (the seed's teachers) | "batched" (OnlineTargets, inline) | "side_stream"
    # (OnlineTargets on their own CUDA stream, read by the model after its decoder) | "cached"
    targets: str
    switches: tuple[str, ...] = ()  # of "float8", "liger", "ac", "flash", "compile" (in order)


MODES = {
    "seed": Mode("reference", "per_image"),
    "fused_cached": Mode("auto", "cached"),
    "fused_online": Mode("auto", "batched"),
    "fused_online_side": Mode("auto", "side_stream"),
    "reference": Mode("reference", "cached"),
    "fused_cached_ac": Mode("auto", "cached", ("ac",)),
    # liger-kernel's SwiGLU keeps gate and up only (recomputes silu): ~1/3 less MLP activation
    # memory in the frozen decoder; its RMSNorm too. CUDA only (its kernels need a GPU).
    "fused_cached_liger": Mode("auto", "cached", ("liger",)),
    "fused_cached_compile": Mode("auto", "cached", ("compile",)),
    "fused_cached_float8": Mode("auto", "cached", ("float8", "compile")),
    # The decoder's attention through the flash-attn package (model.attn_implementation=
    # flash_attention_2) instead of SDPA: CUDA and flash-attn installed, else a skipped row.
    "fused_cached_flash": Mode("auto", "cached", ("flash",)),
}
PROVIDERS = tuple(MODES)  # the run order
ALIASES = {"fused": "fused_cached"}  # the name of fused_cached in records before the modes
CPU_DEFAULT = tuple(p for p in PROVIDERS
                    if not {"compile", "liger", "flash"} & set(MODES[p].switches))
IMPL = {name: m.impl for name, m in MODES.items()} | {"fused": "auto"}
AC_MODE = "selective"
FLOAT8_RECIPE = "tensorwise"


def float8_unavailable(device: str) -> str:
    """Why the float8 mode cannot run here ("" if it can)."""
    import importlib.util  # noqa: PLC0415

    if importlib.util.find_spec("torchao") is None:
        return "skipped: float8 needs torchao (not installed)"
    if torch.device(device).type == "cuda" and torch.version.hip is None:
        major, minor = torch.cuda.get_device_capability()
        if (major, minor) < (8, 9):
            return (f"skipped: float8 needs sm_89+, {torch.cuda.get_device_name()} is "
                    f"sm_{major}{minor}")
    return ""


def flash_unavailable(device: str) -> str:
    """Why the flash-attn mode cannot run here ("" if it can)."""
    import importlib.util  # noqa: PLC0415

    if torch.device(device).type != "cuda":
        return "skipped: flash-attn needs a CUDA GPU"
    if importlib.util.find_spec("flash_attn") is None:
        return "skipped: flash-attn is not installed"
    return ""


def mode_unavailable(mode: Mode, device: str) -> str:
    """Why ``mode`` cannot run here ("" if it can): a recorded row instead of a failure."""
    if "float8" in mode.switches:
        return float8_unavailable(device)
    if "flash" in mode.switches:
        return flash_unavailable(device)
    return ""


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------


def _free(model: OlaVLM | None, device: str) -> None:
    if model is not None:
        model.zero_grad(set_to_none=True)
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def _shape(model: OlaVLM, preset: Preset, batch: Batch) -> str:
    length = batch.input_ids.shape[1] - 1 + model.num_image_tokens + \
        len(model.tasks) * model.config.num_task_tokens
    return f"{preset.name}-B{batch.batch}-L{length}"


def llm_mfu(preset: Preset, batch: Batch, ms: float, device: str) -> float | None:
    """MFU of the LLM part (module docstring); None where the device's peak is unknown."""
    lengths = batch.lengths
    seq = sum(n * n for n in lengths) / sum(lengths)  # attention's T, averaged over tokens
    per_token = flops_per_token(preset.llm, seq_len=seq, weights_trainable=False,
                                supervised_fraction=batch.num_labels / sum(lengths))
    return mfu(sum(lengths) / (ms * 1e-3), per_token, peak_flops(device, "bf16"))


def _compile_call(step, setup, device: str) -> tuple[float, int]:
    """Seconds of the first (compiling) call and the graphs compiled during it."""
    from torch._dynamo.utils import counters  # noqa: PLC0415

    graphs = counters["stats"]["unique_graphs"]
    setup()
    t0 = time.perf_counter()
    step()
    _sync(device)
    return time.perf_counter() - t0, counters["stats"]["unique_graphs"] - graphs


def measure(model: OlaVLM, preset: Preset, provider: str, batch: Batch, *, device: str,
            warmup: int, rep: int, extra_note: str = "",
            targets: Callable[[], dict[str, torch.Tensor]] | None = None):
    """(record, step, setup) of ``provider`` (a mode; its switches already applied) on
    ``batch``; ``targets()`` runs inside the step (None: the batch's cached targets). An OOM
    gives a record with ms nan (and step None)."""
    provider = ALIASES.get(provider, provider)
    mode = MODES[provider]
    model.set_impl(mode.impl)
    b = batch.batch
    shape = _shape(model, preset, batch)

    def setup():
        model.zero_grad(set_to_none=True)

    def step():
        step_targets = batch.targets if targets is None else targets()
        # ntp_rows: the host-side labelled count, as the trainer passes it (an upper bound of
        # the scored count: the shift only drops labels).
        out = model(batch.input_ids, batch.attention_mask, batch.labels, batch.images,
                    batch.image_mask, step_targets, ntp_rows=batch.num_labels)
        out.loss.backward()

    timing, peak, oom, compiled = None, None, "", ""
    try:
        if "compile" in mode.switches:  # its own warm-up: the first call compiles
            seconds, graphs = _compile_call(step, setup, device)
            compiled = f"; compile {seconds:.1f}s (first call, {graphs} graphs)"
            print(f"[{preset.name}] B={b} {provider}: compile {seconds:.1f}s (first call, "
                  f"{graphs} graphs)", flush=True)
            warmup = max(warmup, 1)
        timing = common.do_bench(step, setup=setup, warmup=warmup, rep=rep, device=device)
        peak = common.peak_memory_delta(step, device=device, setup=setup)
    except RuntimeError as err:  # torch.OutOfMemoryError, or cuBLAS failing to allocate
        if not common.is_oom(err):
            raise
        oom = str(err).split("\n")[0][:160]
    _free(model, device)  # outside the except block: its traceback no longer holds tensors
    tokens = sum(batch.lengths)
    alias = "; = 'fused' in earlier rows" if provider == "fused_cached" else ""
    about = f"impl={mode.impl}; targets={mode.targets}{alias}"
    if oom:
        return skipped_record(preset, provider, shape, f"OOM: {oom}; {about}{extra_note}"), \
            None, setup
    seconds = timing.median_ms * 1e-3
    util = llm_mfu(preset, batch, timing.median_ms, device)
    note = (f"{b / seconds:.2f} samples/s; {tokens / seconds:.0f} tokens/s; {tokens} tokens; "
            f"MFU {'n/a' if util is None else f'{util:.1%}'}; {about}{compiled}{extra_note}")
    record = common.make_record(
        op=OP, provider=provider, mode="fwd_bwd", shape=shape, dtype=preset.dtype,
        timing=timing, num_flops=step_flops(model, preset, batch), peak_bytes=peak, note=note)
    return record, step, setup


def skipped_record(preset: Preset, provider: str, shape: str, note: str) -> common.Record:
    nan = float("nan")
    return common.make_record(op=OP, provider=provider, mode="fwd_bwd", shape=shape,
                              dtype=preset.dtype, timing=common.Timing(nan, nan, nan, 0),
                              note=note)


class StepBench:
    """One preset on one device: the model (built once, reconfigured per mode), the teachers
    (built on first use) and one batch (with its photos) per batch size."""

    def __init__(self, preset: Preset, device: str) -> None:
        self.preset, self.device = preset, device
        self.model, self.seconds = build_model(preset, device)
        self.switches: tuple[str, ...] = ()
        self.switch_note = ""
        self._blocks: list[nn.Module] | None = None  # the unwrapped blocks while AC is on
        self.teachers: list | None = None
        self._batches: dict[int, Batch] = {}

    def batch(self, size: int) -> Batch:
        if size not in self._batches:
            batch = make_batch(self.model, self.preset, size, self.device)
            width, height = self.preset.photo_size
            photos = bench_teachers.photos(size, width, height)
            if torch.device(self.device).type == "cuda":  # as a loader's pinned buffers
                photos = [p.pin_memory() for p in photos]
            batch.photos = photos
            self._batches[size] = batch
        return self._batches[size]

    def get_teachers(self) -> list:
        if self.teachers is None:
            t0 = time.perf_counter()
            self.teachers = build_teachers(self.preset, self.device, self.model.config.heads)
            _sync(self.device)
            gib = sum(t.param_bytes() for t in self.teachers) / 2**30
            print(f"[{self.preset.name}] teachers ({self.preset.teachers}) built on "
                  f"{self.device} in {time.perf_counter() - t0:.1f}s ({gib:.2f} GiB)", flush=True)
        return self.teachers

    def drop_teachers(self) -> None:
        self.teachers = None
        _free(None, self.device)

    def targets(self, mode: Mode, batch: Batch) -> Callable[[], dict] | None:
        """What the step calls for its targets; None: the batch's cached targets."""
        if mode.targets == "cached":
            return None
        teachers, dtype = self.get_teachers(), self.preset.dtype
        if mode.targets == "per_image":
            return lambda: per_image_targets(teachers, batch.photos, self.device, dtype)
        from olavlm.teachers.online import OnlineTargets  # noqa: PLC0415

        side = mode.targets == "side_stream"
        online = OnlineTargets(teachers, side_stream=side, measure_memory_steps=0)
        view = SimpleNamespace(raw_images=batch.photos, teacher_views={}, maps=None,
                               image_mask=batch.image_mask)
        if side:  # as the trainer: submitted before the forward, waited for after the decoder
            return lambda: online.submit(view).lazy()
        return lambda: {k: v.to(dtype) for k, v in online(view).targets.items()}

    def configure(self, mode: Mode) -> str:
        """Apply ``mode``'s switches (undoing the previous mode's); returns what was done."""
        from olavlm.train.parallel import (  # noqa: PLC0415
            apply_activation_checkpointing,
            apply_compile,
            apply_float8,
            apply_liger,
        )

        if mode.switches != self.switches:
            if {"compile", "float8", "liger"} & set(self.switches):  # not undoable: rebuild
                torch._dynamo.reset()  # compiled code must not keep the old model alive
                self.model = None
                self._blocks = None
                _free(None, self.device)
                t0 = time.perf_counter()
                self.model, _ = build_model(self.preset, self.device)
                print(f"[{self.preset.name}] model rebuilt in {time.perf_counter() - t0:.1f}s "
                      f"(after {'+'.join(self.switches)})", flush=True)
            elif self._blocks is not None:  # unwrap the checkpointed blocks
                for i, block in enumerate(self._blocks):
                    self.model.parts.layers[i] = block
                self._blocks = None
            attention = "flash_attention_2" if "flash" in mode.switches else "sdpa"
            if self.model.llm.config._attn_implementation != attention:
                self.model.llm.set_attn_implementation(attention)
            notes, num = [], len(self.model.parts.layers)
            if "float8" in mode.switches:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message="parallel.float8 on CPU")
                    count = apply_float8(self.model, FLOAT8_RECIPE, torch.device(self.device))
                cpu = " (CPU: numerics only)" if self.device == "cpu" else ""
                notes.append(f"float8 {FLOAT8_RECIPE} on {count} linears{cpu}")
            if "liger" in mode.switches:
                count = apply_liger(self.model, torch.device(self.device))
                notes.append(f"liger: {count} RMSNorm/SwiGLU modules")
            if "ac" in mode.switches:
                self._blocks = list(self.model.parts.layers)
                count = apply_activation_checkpointing(self.model, AC_MODE)
                notes.append(f"AC {AC_MODE}: {count}/{num} blocks")
            if "flash" in mode.switches:
                notes.append("attention: flash_attention_2 (flash-attn)")
            if "compile" in mode.switches:
                torch._dynamo.reset()  # a fresh compile: its time is this mode's
                apply_compile(self.model)
                notes.append(f"compiled {num} blocks")
            self.switches, self.switch_note = mode.switches, "; ".join(notes)
        self.model.set_impl(mode.impl)
        return self.switch_note

    def measure(self, provider: str, batch: Batch, *, warmup: int, rep: int):
        """``measure`` of ``provider`` after configuring the model and the targets for it."""
        mode = MODES[ALIASES.get(provider, provider)]
        switched = self.configure(mode)
        note = f"; {switched}" if switched else ""
        return measure(self.model, self.preset, provider, batch, device=self.device,
                       warmup=warmup, rep=rep, targets=self.targets(mode, batch),
                       extra_note=f"{note}; {decoder_note(self.model, batch)}; "
                                  f"build {self.seconds['llm']:.1f}s")


def decoder_note(model: OlaVLM, batch: Batch) -> str:
    """Which of the decoder's lean/fused modules this mode runs, and whether the decoder gets
    the padding mask (read from the host copy of the batch's mask)."""
    from olavlm.models.fused_rope import FusedRopeAttention  # noqa: PLC0415
    from olavlm.models.lean_mlp import LeanSwiGLUMLP  # noqa: PLC0415
    from olavlm.models.lean_norm import LeanRMSNorm  # noqa: PLC0415

    modules = list(model.llm.modules())
    norms = sum(isinstance(m, LeanRMSNorm) and m.lean for m in modules)
    mlps = sum(isinstance(m, LeanSwiGLUMLP) and m.lean for m in modules)
    ropes = sum(isinstance(m, FusedRopeAttention) and m.fused_rope for m in modules)
    mask = batch.attention_mask.detach().cpu().bool()
    right_padded = not bool((~mask[:, :-1] & mask[:, 1:]).any())
    dropped = right_padded and model.impl != "reference" and not model.config.seed_compat
    return (f"decoder: {norms} lean norms, {mlps} lean MLPs, {ropes} fused RoPE, padding mask "
            f"{'dropped' if dropped else 'kept'}")


def summary_rows(records: list[common.Record], batches: dict[str, Batch],
                 preset: Preset) -> list[dict]:
    """Table rows: samples/s, tokens/s, LLM MFU, and each mode's speedup and memory ratio over
    ``seed`` (over ``reference`` where seed was not run)."""
    ok = {(r.shape, r.provider): r for r in records if not math.isnan(r.ms)}
    rows = []
    for r in records:
        batch = batches[r.shape]
        row = {"shape": r.shape, "provider": r.provider, "peak_mib": r.peak_mib}
        if (r.shape, r.provider) not in ok:
            row["note"] = r.note.split(":")[0]  # OOM / skipped
            rows.append(row)
            continue
        util = llm_mfu(preset, batch, r.ms, DEVICE)
        row |= {"ms": r.ms, "samples_s": batch.batch / r.ms * 1e3,
                "tokens_s": sum(batch.lengths) / r.ms * 1e3, "tflops": r.tflops,
                "mfu": None if util is None else f"{util:.1%}"}
        base = ok.get((r.shape, "seed")) or ok.get((r.shape, "reference"))
        if base is not None and base is not r:
            row["speedup"] = f"{base.ms / r.ms:.2f}x {base.provider}"
            if r.peak_mib and base.peak_mib:
                row["mem_ratio"] = f"{r.peak_mib / base.peak_mib:.2f}"
        compiled = r.note.split("; compile ")
        if len(compiled) > 1:
            row["note"] = "compile " + compiled[1].split(" (")[0]
        rows.append(row)
    return rows


def goal_lines(records: list[common.Record], batches: dict[str, Batch],
               preset: Preset) -> list[str]:
    """The issues' goals, and what this run measured against them."""
    ok = {(r.shape, r.provider): r for r in records if not math.isnan(r.ms)}
    gpu = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu: not a measurement"
    lines = [f"goals (on an H100; this run: {gpu}):",
             "  training issue: fused_cached >= 3x seed's samples/s; LLM-part MFU >= 45% (bf16)",
             "  model issue: fused_cached >= 1.5x reference's samples/s at <= 0.70x its peak "
             "memory"]
    for shape in dict.fromkeys(r.shape for r in records):
        fused, got = ok.get((shape, "fused_cached")), []
        for name in ("seed", "reference"):
            base = ok.get((shape, name))
            if fused and base:
                mem = (f" at {fused.peak_mib / base.peak_mib:.2f}x its memory"
                       if fused.peak_mib and base.peak_mib else "")
                got.append(f"{base.ms / fused.ms:.2f}x {name}{mem}")
        mfus = {p: llm_mfu(preset, batches[s], r.ms, DEVICE) for (s, p), r in ok.items()
                if s == shape}
        mfus = {p: v for p, v in mfus.items() if v is not None}
        if mfus:
            best = max(mfus, key=mfus.get)
            here = f"{mfus['fused_cached']:.1%}, " if "fused_cached" in mfus else ""
            got.append(f"LLM MFU {here}best {mfus[best]:.1%} ({best})")
        if got:
            lines.append(f"  {shape}: fused_cached {'; '.join(got)}")
        side = side_stream_line(ok, shape)
        if side:
            lines.append(f"  {shape}: {side}")
    return lines


def side_stream_line(ok: dict, shape: str) -> str:
    """What the teachers' side stream saved: fused_online_side against fused_online, as a share
    of the teachers' inline cost (fused_online - fused_cached) where that was measured."""
    inline, side = ok.get((shape, "fused_online")), ok.get((shape, "fused_online_side"))
    if not (inline and side):
        return ""
    saved = inline.ms - side.ms
    line = f"side stream {side.ms:.1f} ms against inline {inline.ms:.1f}: {saved:+.1f} ms saved"
    cached = ok.get((shape, "fused_cached"))
    if cached and inline.ms > cached.ms:
        teachers = inline.ms - cached.ms
        line += f" of the teachers' {teachers:.1f} ms inline ({saved / teachers:.0%} hidden)"
    if side.peak_mib and inline.peak_mib:
        line += f"; peak {side.peak_mib:.0f} MiB against {inline.peak_mib:.0f}"
    return line


TABLE = ("shape", "provider", "ms", "samples_s", "tokens_s", "mfu", "tflops", "peak_mib",
         "speedup", "mem_ratio", "note")
HEADERS = {"samples_s": "samples/s", "tokens_s": "tokens/s", "mfu": "LLM MFU",
           "tflops": "TFLOP/s", "peak_mib": "peak MiB", "speedup": "speedup over",
           "mem_ratio": "mem ratio"}


# --------------------------------------------------------------------------------------------
# pytest-benchmark entry (llama3_8b B=8 on a GPU, tiny on the CPU; the model is built once)
# --------------------------------------------------------------------------------------------

_RUNNERS: dict[str, StepBench] = {}


def _cached_runner(name: str) -> StepBench:
    if name not in _RUNNERS:
        _RUNNERS.clear()
        _RUNNERS[name] = StepBench(PRESETS[name], DEVICE)
    return _RUNNERS[name]


@pytest.mark.parametrize("provider", ("seed", "fused_cached", "fused_online", "fused_online_side",
                                      "reference"))
def test_ola_step(benchmark, request, provider):
    from conftest import bench_preset  # noqa: PLC0415

    preset = PRESETS["llama3_8b" if bench_preset(request.config) == "full" else "tiny"]
    runner = _cached_runner(preset.name)
    warmup, rep = common.bench_reps((2, 5))
    record, step, setup = runner.measure(provider, runner.batch(preset.batches[0]),
                                         warmup=warmup, rep=rep)
    if step is None:
        common.append_records([record])
        pytest.skip(record.note)
    common.finish_pytest_benchmark(benchmark, record, step, setup, rep,
                                   fields=("ms", "tflops", "peak_mib", "note"))


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def parse_providers(text: str | None) -> list[str]:
    """``--providers``: names (or aliases) separated by commas, or "all"; in run order."""
    if text is None:
        return list(PROVIDERS if DEVICE == "cuda" else CPU_DEFAULT)
    names = [ALIASES.get(p, p) for p in text.split(",") if p]
    if names == ["all"]:
        return list(PROVIDERS)
    unknown = sorted(set(names) - set(PROVIDERS))
    if unknown or not names:
        raise ValueError(f"--providers: unknown {unknown}; choose from {PROVIDERS}, their "
                         f"aliases {sorted(ALIASES)} or 'all', got {text!r}")
    return [p for p in PROVIDERS if p in names]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default=default_preset(),
                        help="model shapes (default: llama3_8b with CUDA, else tiny)")
    parser.add_argument("--batch", default=None,
                        help="batch sizes, comma-separated, or 'all' for the preset's list "
                             "(default: the preset's first, 8 on the GPU presets)")
    parser.add_argument("--providers", default=None,
                        help=f"modes, comma-separated, or 'all': {', '.join(PROVIDERS)} "
                             "('fused' = fused_cached); default all on a GPU, the uncompiled "
                             "ones on the CPU")
    parser.add_argument("--warmup", type=int, default=None, help="default 2 (GPU), 0 (CPU)")
    parser.add_argument("--rep", type=int, default=None, help="default 5 (GPU), 1 (CPU)")
    parser.add_argument("--profile", default="",
                        help="modes, comma-separated, whose step is also run once under "
                             "torch.profiler: device time per kind of kernel and the top "
                             "kernels (benchmarks/kernel_breakdown.py)")
    args = parser.parse_args(argv)
    try:
        args.providers = parse_providers(args.providers)
        args.profile = parse_providers(args.profile) if args.profile else []
    except ValueError as err:
        parser.error(str(err))
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
    runner = StepBench(preset, DEVICE)
    built = ", ".join(f"{k} {v:.1f}s" for k, v in runner.seconds.items())
    weights = ""
    if DEVICE == "cuda":
        weights = f"; {torch.cuda.memory_allocated() / 2**30:.1f} GiB allocated"
    print(f"[{preset.name}] built on {DEVICE} in {time.perf_counter() - t0:.1f}s ({built})"
          f"{weights}", flush=True)
    print(f"[{preset.name}] {trainable_summary(runner.model)}", flush=True)
    print(f"[{preset.name}] modes: {', '.join(args.providers)}", flush=True)
    online = [p for p in args.providers if MODES[p].targets != "cached"]
    records, batches, failed = [], {}, set()
    for provider in args.providers:
        mode = MODES[provider]
        unavailable = mode_unavailable(mode, DEVICE)
        for b in sorted(args.batch):
            batch = runner.batch(b)
            if provider in failed:  # it ran out of memory at a smaller batch
                print(f"[{preset.name}] B={b} {provider}: skipped (OOM at a smaller batch)")
                continue
            t1 = time.perf_counter()
            if unavailable:
                record = skipped_record(preset, provider, _shape(runner.model, preset, batch),
                                        unavailable)
            else:
                try:  # the step is dropped at once: it holds the model (rebuilt by compile)
                    record, step, setup = runner.measure(provider, batch, warmup=args.warmup,
                                                         rep=args.rep)
                    if provider in args.profile and step is not None:
                        print(f"[{preset.name}] B={b} {provider}: "
                              f"{kernel_breakdown(step, setup, DEVICE)}", flush=True)
                    del step, setup
                except Exception as err:  # one mode's failure must not end the GPU window
                    traceback.print_exc()
                    first = (str(err).splitlines() or [""])[0][:160]
                    record = skipped_record(preset, provider,
                                            _shape(runner.model, preset, batch),
                                            f"error: {type(err).__name__}: {first}")
            batches[record.shape] = batch
            common.append_records([record])  # now: a later timeout keeps what was measured
            records.append(record)
            if math.isnan(record.ms) and not unavailable:
                failed.add(provider)
            print(f"[{preset.name}] B={b} {provider}: {record.ms:.1f} ms, "
                  f"{time.perf_counter() - t1:.1f}s wall ({record.note})", flush=True)
        if online and provider == online[-1]:
            runner.drop_teachers()  # no online mode left: free their memory
    print(common.format_table(summary_rows(records, batches, preset), TABLE, HEADERS))
    print("\n".join(goal_lines(records, batches, preset)))
    print(f"total {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
