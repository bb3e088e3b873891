# Benchmark of linear_cross_entropy against eager, torch.compile, liger-kernel and CCE.
"""LM head + cross-entropy, fwd+bwd, bf16, Llama-3 and Phi-3 heads, 0% and 90% ignored labels.

    pytest benchmarks/bench_linear_cross_entropy.py --benchmark-only [--bench-preset full|tiny]
    (on a GPU the "full" preset is the quick grid unless OLAVLM_LCE_PRESET=full)
    python benchmarks/bench_linear_cross_entropy.py --preset quick

FLOPs counted on the labelled rows only (what must be done): forward logits 2*n*V*H, grad_hidden
2*n*V*H, grad_weight 2*n*V*H when the weight trains (n = labelled tokens). TFLOP/s = those FLOPs
over device time; peak MiB = allocation above the inputs during one fwd+bwd (gradients included).
Providers: "eager" (F.linear, .float(), F.cross_entropy: what a model's loss does), its
torch.compile, "liger" and "cce" when those packages are installed, "triton" (ours), and
"triton_bound" (ours given the labelled count from the host, ``max_valid_tokens``, as the
trainer passes it: buffers sized by it, and the BLAS schedule where the tile knob "blas" takes
it, a frozen head or a trainable one with most rows labelled; the note says which ran), and
"triton_module" (the drop-in ``LinearCrossEntropy`` without a bound: after the warm-up calls
the previous call's labelled fraction picks the schedule), and "liger_gathered" (liger-kernel
on the labelled rows only, gathered by an index the host already has from its CPU copy of the
labels: the fair comparison for "triton_bound", which also gets host-side knowledge; the
gather and its backward's scatter are timed).
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
if not torch.cuda.is_available():  # before triton is imported: kernels run in the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import common  # noqa: E402

from olakernels import linear_cross_entropy  # noqa: E402
from olakernels.testing import make_lm_head_inputs  # noqa: E402

DEVICE = common.bench_device()
OP = "linear_cross_entropy"
# Ours first: a GPU window's stage limit may cut the tail of the list.
PROVIDERS = ("triton", "triton_bound", "triton_module", "liger", "liger_gathered", "eager",
             "cce", "eager_compile")
HEADS = {"llama3": (4096, 128256), "phi3": (3072, 32064)}  # (H, V) of the real models


@dataclass(frozen=True)
class Case:
    head: str
    tokens: int
    hidden: int
    vocab: int
    ignored: float
    train_weight: bool
    dtype: torch.dtype = torch.bfloat16

    @property
    def id(self) -> str:
        w = "trainW" if self.train_weight else "frozenW"
        return f"{self.head}-N{self.tokens}-ign{round(100 * self.ignored)}-{w}"


def cases(preset: str) -> list[Case]:
    if preset == "tiny":  # CPU smoke run
        return [Case("tiny", 64, 32, 256, ig, tw) for ig in (0.0, 0.9) for tw in (True, False)]
    tokens = (16384,) if preset == "quick" else (4096, 16384, 32768)
    heads = ("llama3",) if preset == "quick" else ("llama3", "phi3")
    # 90% ignored first, frozen weight first (the pre-training case and the 5x goal): a stage
    # cut by its time limit keeps them (run 5 lost them behind the slow 0% cases).
    return [Case(h, n, *HEADS[h], ig, tw) for h in heads for n in tokens for ig in (0.9, 0.0)
            for tw in (False, True)]


def labelled(case: Case) -> int:
    return case.tokens - round(case.ignored * case.tokens)


def min_flops(case: Case) -> int:
    per = 2 * labelled(case) * case.vocab * case.hidden
    return per * (3 if case.train_weight else 2)


def _eager(h, w, y):
    return F.cross_entropy(F.linear(h, w).float(), y, ignore_index=-100)


_compiled = {}


def loss_fn(provider: str, case: Case | None = None):
    if provider == "triton_bound":
        bound = labelled(case)
        return lambda h, w, y: linear_cross_entropy(h, w, y, impl="triton",
                                                    max_valid_tokens=bound)
    if provider == "triton_module":  # the drop-in module, no bound: from its second call the
        # previous call's labelled fraction picks the schedule (the warm-up calls give it one)
        from olakernels import LinearCrossEntropy

        head = LinearCrossEntropy(1, 1, bias=False, device="meta", impl="triton")
        return lambda h, w, y: torch.func.functional_call(head, {"weight": w}, (h, y))
    if provider == "eager":
        return _eager
    if provider == "eager_compile":
        return _compiled.setdefault("eager", torch.compile(_eager))
    if provider == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        lce = LigerFusedLinearCrossEntropyLoss(ignore_index=-100)
        return lambda h, w, y: lce(w, h, y)
    if provider == "liger_gathered":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        lce = LigerFusedLinearCrossEntropyLoss(ignore_index=-100)
        gathered = {}  # labels -> (rows, their labels): what the host knows before the step

        def on_labelled_rows(h, w, y):
            if id(y) not in gathered:
                rows = (y != -100).nonzero().squeeze(1)
                gathered[id(y)] = (y, rows, y[rows])
            _, rows, y_rows = gathered[id(y)]
            return lce(w, h.index_select(0, rows), y_rows)

        return on_labelled_rows
    if provider == "cce":
        from cut_cross_entropy import linear_cross_entropy as cce

        return lambda h, w, y: cce(h, w, y, ignore_index=-100)
    return lambda h, w, y: linear_cross_entropy(h, w, y, impl=provider)


def available(provider: str) -> bool:
    module = {"liger": "liger_kernel", "liger_gathered": "liger_kernel",
              "cce": "cut_cross_entropy"}.get(provider)
    if module is None:
        return provider != "eager_compile" or torch.cuda.is_available()  # (triton_bound too)
    try:
        __import__(module)
    except ImportError:
        return False
    return torch.cuda.is_available() or provider in ("liger", "liger_gathered")


_INPUTS: dict[tuple, tuple] = {}


def inputs(case: Case, device: str) -> tuple:
    """The case's (hidden, weight, labels), drawn once per shape and kept for every provider:
    drawing the Llama-3 head costs seconds, and a GPU window's stage has a time limit. Drawn on
    the GPU in fp32 there (on the CPU dry run in float64, as the tests)."""
    key = (case.tokens, case.hidden, case.vocab, case.dtype, case.ignored, device)
    if key not in _INPUTS:
        if len(_INPUTS) >= 2:  # a few cases' tensors at most (the Llama-3 head: ~1 GB in bf16)
            _INPUTS.pop(next(iter(_INPUTS)))
        hidden, weight, labels, _ = make_lm_head_inputs(
            (case.tokens,), case.hidden, case.vocab, dtype=case.dtype, device=device,
            ignored=case.ignored, draw_on_device=torch.device(device).type == "cuda")
        _INPUTS[key] = (hidden, weight, labels)
    return _INPUTS[key]


def measure(provider: str, case: Case, *, device: str, warmup: int, rep: int):
    hidden, weight, labels = inputs(case, device)
    hidden.requires_grad_(True)
    weight.requires_grad_(case.train_weight)
    fn = loss_fn(provider, case)

    def setup():
        hidden.grad = None
        weight.grad = None

    def step():
        fn(hidden, weight, labels).backward()

    note = case.id
    if provider in ("triton", "triton_bound", "triton_module"):  # which backward ran (records
        # from before the slabs are "rows"), and for how many rows
        from olakernels.linear_cross_entropy import api
        from olakernels.linear_cross_entropy.impl import triton as lce_triton

        bound = api.bounded_rows(labelled(case) if provider == "triton_bound" else None)
        rows = lce_triton.row_capacity(case.tokens, bound)
        vocab = lce_triton.uses_vocab_schedule(lce_triton._blocks(), case.train_weight,
                                               rows, case.vocab)
        raw = labelled(case) if provider == "triton_bound" else None
        # the module's hint after its warm-up calls: this case's own labelled fraction
        hint = labelled(case) / case.tokens if provider == "triton_module" else None
        schedule = lce_triton.forward_schedule(hidden, weight, raw, case.train_weight, True,
                                               hint)
        if schedule == "blas":
            note += "; BLAS schedule (gradients in the forward)"
        else:
            note += f"; backward {'vocab slabs' if vocab else 'row chunks'}"
        if provider == "triton_bound":
            note += f"; sized for {rows} rows"
    try:
        timing = common.do_bench(step, setup=setup, warmup=warmup, rep=rep, device=device)
        peak = common.peak_memory_delta(step, device=device, setup=setup)
    except RuntimeError as err:  # torch.OutOfMemoryError, or cuBLAS failing to allocate
        if not common.is_oom(err):
            raise
        torch.cuda.empty_cache()
        timing, peak, note = common.Timing(float("nan"), float("nan"), float("nan"), 0), None, \
            f"{case.id}; out of memory"
    record = common.make_record(
        op=OP, provider=provider, mode="fwd_bwd" if case.train_weight else "fwd_bwd_frozenW",
        shape=f"{case.tokens}x{case.hidden}x{case.vocab}-ign{round(100 * case.ignored)}",
        dtype=case.dtype, timing=timing, num_flops=min_flops(case), peak_bytes=peak, note=note)
    return record, step, setup


def pytest_generate_tests(metafunc):
    from conftest import bench_preset  # noqa: PLC0415

    if "lce_case" in metafunc.fixturenames:
        # On a GPU: the "quick" grid unless OLAVLM_LCE_PRESET=full (72 runs, several minutes).
        preset = bench_preset(metafunc.config)
        if preset == "full":
            preset = os.environ.get("OLAVLM_LCE_PRESET", "quick")
        selected = cases(preset)
        metafunc.parametrize("lce_case", selected, ids=[c.id for c in selected])


@pytest.mark.parametrize("provider", PROVIDERS)
def test_linear_cross_entropy(benchmark, provider, lce_case):
    if not available(provider):
        pytest.skip(f"{provider} is not installed or needs a GPU")
    warmup, rep = common.bench_reps((3, 20))
    record, step, setup = measure(provider, lce_case, device=DEVICE, warmup=warmup, rep=rep)
    common.finish_pytest_benchmark(benchmark, record, step, setup, rep)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["tiny", "quick", "full"],
                        default="quick" if torch.cuda.is_available() else "tiny")
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    args = parser.parse_args(argv)
    providers = [p for p in args.providers.split(",") if p]
    unknown = sorted(set(providers) - set(PROVIDERS) - {"torch"})
    if unknown:
        parser.error(f"--providers: unknown {unknown}; choose from {PROVIDERS}")
    warmup, rep = common.bench_reps((3, 20))
    records = [measure(p, case, device=DEVICE, warmup=warmup, rep=rep)[0]
               for case in cases(args.preset) for p in providers
               if (p == "torch" or available(p))]
    common.append_records(records)
    print(common.format_table(records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
