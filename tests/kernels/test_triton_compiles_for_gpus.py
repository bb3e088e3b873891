# Ahead-of-time compile of the Triton kernels for Hopper (sm_90) and MI300X (gfx942), no GPU.
"""The CPU interpreter cannot catch what only the GPU compiler rejects (types of loop-carried
values, tl.dot operand layouts, shared-memory limits, constexpr branches). This test compiles
each kernel, for each feature combination the launchers use, with Triton's own compilers for
an H100/H200 and an MI300X. It runs in a subprocess because TRITON_INTERPRET=1 (set for the
rest of the suite) replaces @triton.jit functions with interpreted ones.
"""
import inspect
import os
import subprocess
import sys

import pytest

TARGETS = [("cuda", 90, 32), ("hip", "gfx942", 64)]


def _signature(fn, pointers: dict[str, str], floats=(), constexprs=()):
    sig = {}
    for name in inspect.signature(fn).parameters:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
        elif name in floats:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _compile(kernel, pointers, floats, constexprs: dict, target, num_warps=4, num_stages=None):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = kernel
    while not isinstance(fn, triton.runtime.JITFunction):  # unwrap @triton.autotune
        fn = fn.fn
    names = list(inspect.signature(fn.fn).parameters)
    sig = _signature(fn.fn, pointers, floats, constexprs)
    consts = {(names.index(k),): v for k, v in constexprs.items()}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts)
    options = {"num_warps": num_warps}
    if num_stages is not None:
        options["num_stages"] = num_stages
    triton.compile(src, target=GPUTarget(*target), options=options)


def compile_embedding_loss_kernels(target) -> int:
    from olakernels.embedding_loss.impl import triton as k

    count = 0
    for dt, native in (("bf16", True), ("fp16", True), ("fp32", False)):
        for with_dot, shared in ((True, True), (True, False), (False, False)):
            parts = {n: "*fp32" for n in ("SL1_PART", "PP_PART", "DOT_PART", "TT_PART")}
            _compile(k._embedding_distill_loss_fwd_kernel,
                     {"P": "*" + dt, "T": "*" + dt, "G": "*" + dt, **parts},
                     ("beta", "inv_beta"),
                     {"WITH_DOT": with_dot, "DOT_NATIVE": native, "SHARED_TILE": shared,
                      "BLOCK_B": 32, "BLOCK_G": 32, "BLOCK_D": 128}, target)
            coefs = {n: "*fp32" for n in ("COEF_SL1", "COEF_P", "COEF_C", "OUT", "G_OUT",
                                          "GRAD_LS")}
            _compile(k._embedding_distill_loss_bwd_kernel,
                     {"P": "*" + dt, "T": "*" + dt, "G": "*" + dt, "GRAD": "*" + dt, **coefs},
                     ("beta", "inv_beta"),
                     {"WITH_DOT": with_dot, "DOT_PREC": "ieee" if dt == "fp32" else "tf32",
                      "SHARED_TILE": shared, "BLOCK_B": 16, "BLOCK_G": 16, "BLOCK_D": 256},
                     target)
            count += 2
    rows_ptrs = {n: "*fp32" for n in ("SL1_PART", "PP_PART", "DOT_PART", "TT_PART", "MASK",
                                      "GMASK", "LOGIT_SCALE", "ROW_OUT", "COEF_SL1", "COEF_P",
                                      "COEF_C")}
    for seed_mode in (True, False):
        for with_dot in (True, False):
            _compile(k._embedding_distill_loss_rows_kernel, rows_ptrs,
                     ("contrastive_weight", "max_logit_scale"),
                     {"SEED_MODE": seed_mode, "WITH_DOT": with_dot, "BLOCK_C": 64,
                      "BLOCK_GC": 64, "BLOCK_BM": 32}, target)
            count += 1
    _compile(k._embedding_distill_loss_total_kernel, {"ROW_OUT": "*fp32", "OUT": "*fp32"}, (),
             {"BLOCK": 32}, target)
    return count + 1


def compile_linear_cross_entropy_kernels(target) -> int:
    from olakernels.linear_cross_entropy.impl import triton_kernels as k
    from olakernels.linear_cross_entropy.impl.triton import GPU_BLOCKS, ROCM_BLOCKS

    # The launchers' own tile sizes, warps and stages for this target.
    blk = GPU_BLOCKS if target[0] == "cuda" else ROCM_BLOCKS
    launch = {"num_warps": blk["num_warps"], "num_stages": blk["num_stages"]}
    count = 0
    ints = {"ORDER": "*i32", "LABELS": "*i64", "COUNT": "*i32"}
    for dt, native in (("bf16", True), ("fp32", False)):
        for bias, cap in ((True, True), (False, False)):
            tensors = {"HID": "*" + dt, "W": "*" + dt, "BIAS": "*" + dt}
            parts = {n: "*fp32" for n in ("PART_M", "PART_S", "PART_ZY", "PART_SZ", "PART_BEST")}
            tiles = {"BLOCK_N": blk["n"], "BLOCK_V": blk["v"], "BLOCK_K": blk["k"]}
            flags = {"HAS_BIAS": bias, "HAS_SOFTCAP": cap, "DOT_NATIVE": native}
            _compile(k._lce_fwd_kernel, {**tensors, **ints, **parts, "PART_IDX": "*i32"},
                     ("softcap",), {**flags, **tiles}, target, **launch)
            dl = {**tensors, **ints, "LSE": "*fp32", "GRAD_LOSS": "*fp32", "DLOGITS": "*" + dt}
            scalars = ("softcap", "label_smoothing", "z_loss_weight")
            _compile(k._lce_dlogits_kernel, dl, scalars,
                     {**flags, **tiles, "ZERO_PAST_COUNT": cap}, target, **launch)
            # grad_in_forward: the logits themselves (with and without the zeroing branch)
            _compile(k._lce_dlogits_kernel, dl, scalars,
                     {**flags, **tiles, "ZERO_PAST_COUNT": not cap, "WRITE_LOGITS": True},
                     target, **launch)
            _compile(k._lce_rows_grad_kernel,
                     {"LOGITS": "*" + dt, **ints, "LSE": "*fp32", "LOSS": "*fp32",
                      "CORRECT": "*i8"}, scalars,
                     {"HAS_SOFTCAP": cap, "BLOCK_V": blk["row_v"]}, target,
                     num_warps=blk["row_warps"])
            count += 4
        mm = {"BLOCK_M": blk["m"], "BLOCK_H": blk["h"], "BLOCK_K": blk["k"]}
        # grad_hidden in the operand dtype (backward) and in fp32 (grad_in_forward's unit grad)
        for grad_dt in sorted({dt, "fp32"}):
            _compile(k._lce_dhidden_kernel,
                     {"DLOGITS": "*" + dt, "W": "*" + dt, **ints, "GRAD_HID": "*" + grad_dt},
                     (), {"DOT_NATIVE": native, **mm}, target, **launch)
            count += 1
        for acc in (False, True):
            _compile(k._lce_dweight_kernel,
                     {"DLOGITS": "*" + dt, "HID": "*" + dt, **ints, "GRAD_W": "*fp32",
                      "GRAD_B": "*fp32"}, (),
                     {"ACCUMULATE": acc, "HAS_WEIGHT_GRAD": True, "HAS_BIAS": acc,
                      "DOT_NATIVE": native, **mm}, target, **launch)
        count += 2
    parts = {n: "*fp32" for n in ("PART_M", "PART_S", "PART_ZY", "PART_SZ", "PART_BEST", "LSE",
                                  "LOSS")}
    _compile(k._lce_combine_kernel, {**parts, "PART_IDX": "*i32", **ints, "CORRECT": "*i8"},
             ("label_smoothing", "z_loss_weight"), {"BLOCK": 128}, target)
    return count + 1


def compile_perceiver_kernels(target) -> int:
    from olakernels.perceiver.impl import triton as k

    count = 0
    for dt in ("bf16", "fp32"):
        ln = {"X": "*" + dt, "W": "*" + dt, "B": "*" + dt, "Y": "*" + dt, "MEAN": "*fp32",
              "RSTD": "*fp32"}
        _compile(k._layer_norm_fwd_kernel, ln, ("eps",), {"BLOCK_M": 1, "BLOCK_N": 4096}, target)
        bwd = {"DY": "*" + dt, "X": "*" + dt, "W": "*" + dt, "MEAN": "*fp32", "RSTD": "*fp32",
               "DX": "*" + dt, "DW_PART": "*fp32", "DB_PART": "*fp32"}
        _compile(k._layer_norm_bwd_kernel, bwd, (), {"BLOCK_M": 2, "BLOCK_N": 2048}, target)
        _compile(k._gelu_fwd_kernel, {"X": "*" + dt, "Y": "*" + dt}, (), {"BLOCK": 1024}, target)
        _compile(k._gelu_bwd_kernel, {"DY": "*" + dt, "X": "*" + dt, "DX": "*" + dt}, (),
                 {"BLOCK": 1024}, target)
        count += 4
    return count


def main() -> None:
    for target in TARGETS:
        n = compile_embedding_loss_kernels(target)
        print(f"compiled {n} embedding_distill_loss kernels for {target}")
        n = compile_linear_cross_entropy_kernels(target)
        print(f"compiled {n} linear_cross_entropy kernels for {target}")
        n = compile_perceiver_kernels(target)
        print(f"compiled {n} perceiver kernels for {target}")


@pytest.mark.slow
def test_kernels_compile_for_hopper_and_mi300x(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, not from a cache
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("compiled") == 3 * len(TARGETS), proc.stdout


if __name__ == "__main__":
    main()
