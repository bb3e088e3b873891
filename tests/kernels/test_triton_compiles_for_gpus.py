# Ahead-of-time compile of the Triton kernels for Hopper (sm_90) and MI300X (gfx942), no GPU.
"""The CPU interpreter cannot catch what only the GPU compiler rejects (types of loop-carried
values, tl.dot operand layouts, constexpr branches) nor what only the GPU refuses at launch
(more shared memory than a program may have). This test compiles each kernel, for each launch
configuration the launchers use (olakernels/_aot.py), with Triton's own compilers for an
H100/H200 and an MI300X, twice: specialized as the JIT does for sizes that are multiples of 16
(the pipelined kernel, with its multi-stage shared-memory buffers) and unspecialized (odd sizes,
e.g. a 32,001-token vocabulary). Every configuration must compile; those the launchers use
as they are must fit the target's shared memory (autotuned ones need one fitting config per
kernel: the autotuner skips the others); the bf16 LM-head GEMM kernels must not spill registers
on sm_90 (spills in them cost ~2x on an H200, docs/PERF.md).
It runs in a subprocess because TRITON_INTERPRET=1 (set for the rest of the suite) replaces
@triton.jit functions with interpreted ones.
"""
import json
import os
import subprocess
import sys

import pytest

# bf16 LM-head kernels that compile without register spills on sm_90 (kernel_report.py); the
# forward and dlogits kernels spill a little in their softmax epilogue and are not listed.
SPILL_FREE_SM90 = ("lce.dhidden[bf16->bf16]", "lce.dhidden[bf16->fp32]",
                   "lce.dweight[bf16->fp32,accumulate=False]",
                   "lce.dweight[bf16->fp32,accumulate=True]",
                   "lce.dweight[bf16->bf16,accumulate=False]",
                   "lce.dhidden[bf16->bf16,narrow]",
                   "lce.dhidden[bf16,slab,acc_in=False,acc_out=True]",
                   "lce.dhidden[bf16,slab,acc_in=True,acc_out=True]",
                   "lce.dhidden[bf16,slab,acc_in=True,acc_out=False]",
                   "lce.logits[bf16,bias=False,softcap=False,zero_past=True]")


def _autotuned(name: str) -> bool:
    return name.startswith(("embedding_loss.fwd", "embedding_loss.bwd"))


def _key(name: str) -> str:
    """An autotuned kernel's name without its tile/warps/stages part."""
    return name.split(",D")[0].split(",B")[0]


def _launch_key(name: str) -> str:
    """An autotuned launch: the name without the autotuned part (BLOCK_D, warps, stages). The
    launcher picks BLOCK_B itself, so each BLOCK_B needs a fitting config of its own."""
    return name.split(",D")[0]


def _unspecialized_subset(variants):
    # Odd sizes change only vector widths and pipelining: compile the half-precision variants
    # and one config per autotuned kernel (fp32 LM-head kernels take ~10 s each to compile).
    seen, out = set(), []
    for v in variants:
        if "fp32" in v.name or (_autotuned(v.name) and _key(v.name) in seen):
            continue
        seen.add(_key(v.name))
        out.append(v)
    return out


def main() -> None:
    from olakernels import _aot

    results = []
    for target_name, target in _aot.TARGETS.items():
        for specialize in (True, False):
            variants = _aot.all_variants(target)
            for v in variants if specialize else _unspecialized_subset(variants):
                row = dict(target=target_name, specialize=specialize, kernel=v.name)
                try:
                    compiled = _aot.compile_variant(v, target, specialize)
                    want_stats = target_name == "sm_90" and specialize and \
                        v.name in SPILL_FREE_SM90
                    if want_stats:
                        row["spill"] = _aot.kernel_stats(compiled).spill_bytes
                    row["shared"] = compiled.metadata.shared
                    row["limit"] = _aot.SHARED_LIMIT[target_name]
                except Exception as exc:
                    row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
                results.append(row)
    print(json.dumps(results))


def _problems(results: list[dict]) -> list[str]:
    problems = []
    fitting_autotune: dict[tuple, bool] = {}
    for r in results:
        where = f"{r['kernel']} for {r['target']} (specialized={r['specialize']})"
        if "error" in r:
            problems.append(f"{where} does not compile: {r['error']}")
            continue
        fits = r["shared"] <= r["limit"]
        if _autotuned(r["kernel"]):
            # one key per kernel, dtype, mode and launcher-chosen BLOCK_B: the name without
            # the autotuned part
            key = (r["target"], r["specialize"], _launch_key(r["kernel"]))
            fitting_autotune[key] = fitting_autotune.get(key, False) or fits
        elif not fits:
            problems.append(f"{where} needs {r['shared']} bytes of shared memory, the target "
                            f"allows {r['limit']}")
        if r.get("spill"):
            problems.append(f"{where} spills {r['spill']} bytes of registers per thread")
    problems += [f"no autotune config of {k[2]} fits {k[0]}'s shared memory (specialized="
                 f"{k[1]})" for k, ok in fitting_autotune.items() if not ok]
    return problems


@pytest.mark.slow
def test_kernels_compile_for_hopper_and_mi300x(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, not from a cache
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for target in ("sm_90", "gfx942"):  # every op's kernels reached both targets
        for op in ("embedding_loss.", "lce.", "perceiver."):
            assert any(r["target"] == target and r["kernel"].startswith(op) for r in results)
    problems = _problems(results)
    assert not problems, "\n".join(problems)


def test_problem_finder_reports_each_kind_of_failure():
    """The checks above can fail: a compile error, an oversized non-autotuned kernel, spills,
    and an autotuned kernel none of whose configs fit."""
    base = dict(target="sm_90", specialize=True, limit=100)
    results = [
        dict(base, kernel="lce.fwd[x]", error="CompilationError: bad layout"),
        dict(base, kernel="lce.dhidden[bf16->bf16]", shared=200),
        dict(base, kernel="lce.dweight[bf16->fp32,accumulate=True]", shared=50, spill=16),
        dict(base, kernel="embedding_loss.fwd[bf16,dot=True,shared=True,B16,D64,w4,s3]",
             shared=300),
        dict(base, kernel="embedding_loss.fwd[bf16,dot=True,shared=True,B16,D128,w4,s3]",
             shared=400),
        dict(base, kernel="embedding_loss.bwd[bf16,dot=True,shared=True,D128,w4,s2]",
             shared=300),
        dict(base, kernel="embedding_loss.bwd[bf16,dot=True,shared=True,D256,w4,s2]",
             shared=50),
    ]
    problems = _problems(results)
    assert len(problems) == 4, problems
    assert "does not compile" in problems[0]
    assert "needs 200 bytes" in problems[1]
    assert "spills 16 bytes" in problems[2]
    assert "no autotune config of embedding_loss.fwd[bf16,dot=True,shared=True" in problems[3]


def test_each_launcher_tile_needs_a_fitting_autotune_config():
    """BLOCK_B is the launcher's choice, not the autotuner's: a B=32 launch none of whose
    configs fit is a problem even when the B=16 launch has one that does."""
    base = dict(target="sm_90", specialize=True, limit=100)
    results = [
        dict(base, kernel="embedding_loss.fwd[bf16,dot=True,shared=True,B16,D64,w4,s3]",
             shared=50),
        dict(base, kernel="embedding_loss.fwd[bf16,dot=True,shared=True,B32,D64,w4,s3]",
             shared=300),
        dict(base, kernel="embedding_loss.fwd[bf16,dot=True,shared=True,B32,D128,w4,s3]",
             shared=400),
    ]
    problems = _problems(results)
    assert len(problems) == 1 and "shared=True,B32 fits" in problems[0], problems


if __name__ == "__main__":
    main()
