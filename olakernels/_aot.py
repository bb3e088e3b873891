# Ahead-of-time compile of every olakernels Triton kernel for a GPU target, without a GPU.
"""Used by tests/kernels/test_triton_compiles_for_gpus.py (does each launch configuration compile
for an H100/H200 and an MI300X?) and benchmarks/gpu/kernel_report.py (registers, spills, shared
memory and software pipelining of each kernel, read off the compiler's output).

Triton's JIT specializes every launch: pointer arguments (16-byte aligned, as torch allocations
are) and integer arguments that are multiples of 16 get the `tt.divisibility = 16` attribute.
Only then can loads be vectorized to 16 bytes, and only vectorized loads become cp.async copies
that the pipeliner overlaps with the math: a kernel compiled without these hints is a different
(unpipelined) kernel with a different shared-memory footprint. `compile_variant(...,
specialize=True)` reproduces what the JIT builds when the sizes are multiples of 16 (Llama-3's
V = 128,256, H = 4,096, the loss's D); `specialize=False` what it builds for odd sizes (a
32,001-token vocabulary).

Nothing here runs at import of olakernels; it imports triton's compiler lazily.
"""
from __future__ import annotations

import dataclasses
import inspect
import os
import re
import subprocess
import tempfile

TARGETS = {"sm_90": ("cuda", 90, 32), "gfx942": ("hip", "gfx942", 64)}
# Shared memory (LDS) one program may use, and per multiprocessor: H100/H200 227 KiB per block
# of 228 KiB per SM (1 KiB of each block reserved by the driver); MI300X 64 KiB of LDS per CU.
SHARED_LIMIT = {"sm_90": 232448, "gfx942": 65536}
_SM90_SHARED_PER_SM, _SM90_REGS_PER_SM, _SM90_THREADS_PER_SM = 233472, 65536, 2048


@dataclasses.dataclass(frozen=True)
class Variant:
    """One launch configuration of one kernel: argument types, constexprs and launch options."""

    name: str
    kernel: object  # a @triton.jit function, possibly wrapped by @triton.autotune
    pointers: dict  # argument name -> "*bf16" etc.; other arguments are i32 unless in floats
    floats: tuple = ()
    constexprs: dict = dataclasses.field(default_factory=dict)
    num_warps: int = 4
    num_stages: int | None = None  # None: Triton's default


def _jit_fn(kernel):
    import triton

    fn = kernel
    while not isinstance(fn, triton.runtime.JITFunction):  # unwrap @triton.autotune
        fn = fn.fn
    return fn


def compile_variant(v: Variant, target: tuple, specialize: bool = True):
    """triton.compile the variant for `target` (a TARGETS value); returns the CompiledKernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _jit_fn(v.kernel)
    names = list(inspect.signature(fn.fn).parameters)
    sig, attrs = {}, {}
    for i, name in enumerate(names):
        if name in v.constexprs:
            sig[name] = "constexpr"
            continue
        sig[name] = v.pointers.get(name) or ("fp32" if name in v.floats else "i32")
        if specialize and sig[name] != "fp32":  # pointers and integers, as the JIT does
            attrs[(i,)] = [["tt.divisibility", 16]]
    consts = {(names.index(k),): val for k, val in v.constexprs.items()}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    options = {"num_warps": v.num_warps}
    if v.num_stages is not None:
        options["num_stages"] = v.num_stages
    return triton.compile(src, target=GPUTarget(*target), options=options)


@dataclasses.dataclass
class KernelStats:
    registers: int | None  # per thread (ptxas); None where not available (ROCm)
    spill_bytes: int | None  # spill stores + loads, bytes per thread (ptxas)
    shared_bytes: int
    async_copies: int  # cp.async copies in the TTGIR: > 0 means the loads are pipelined
    mma: str  # "wgmma", "mma" or "-"
    num_warps: int = 4
    waves_per_simd: int | None = None  # ROCm: the compiler's occupancy estimate

    def programs_per_sm(self) -> int | None:
        """Resident programs per H100/H200 SM (registers, shared memory, threads); None when
        the register count is unknown or the kernel is not a CUDA one. Registers are allocated
        per warp in units of 256."""
        if self.registers is None or self.waves_per_simd is not None:
            return None
        per_warp = -(-self.registers * 32 // 256) * 256
        by_regs = _SM90_REGS_PER_SM // (per_warp * self.num_warps)
        by_smem = _SM90_SHARED_PER_SM // (self.shared_bytes + 1024)
        by_threads = _SM90_THREADS_PER_SM // (32 * self.num_warps)
        return min(by_regs, by_smem, by_threads, 32)


def _ptxas() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def kernel_stats(compiled, arch: str = "sm_90a") -> KernelStats:
    """Read the compiled kernel's resources: registers and spills from `ptxas -v` (CUDA) or the
    AMDGPU metadata (ROCm: VGPRs, spilled VGPRs x 4 bytes, occupancy in waves per SIMD)."""
    ttgir = compiled.asm["ttgir"]
    registers = spill = waves = None
    if "amdgcn" in compiled.asm:
        def field(key):
            m = re.search(rf"\.{key}:\s*(\d+)", compiled.asm["amdgcn"])
            return int(m.group(1)) if m else None
        registers, spilled, waves = field("vgpr_count"), field("vgpr_spill_count"), None
        spill = None if spilled is None else 4 * spilled
        m = re.search(r"Occupancy:\s*(\d+)", compiled.asm["amdgcn"])
        waves = int(m.group(1)) if m else None
    if "ptx" in compiled.asm and os.path.exists(_ptxas()):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "k.ptx")
            with open(path, "w") as f:
                f.write(compiled.asm["ptx"])
            # The flags Triton's own make_cubin passes (triton 3.8).
            out = subprocess.run([_ptxas(), "-lineinfo", "-v", "--regAllocOptLevel=2",
                                  f"--gpu-name={arch}", path, "-o", os.path.join(tmp, "k.cubin")],
                                 capture_output=True, text=True, check=True).stderr
        m = re.search(r"Used (\d+) registers", out)
        registers = int(m.group(1)) if m else None
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
        spill = int(m.group(1)) + int(m.group(2)) if m else 0
    if "warp_group_dot" in ttgir:
        mma = "wgmma"
    elif "nvidia_mma" in ttgir or "amd_mfma" in ttgir:
        mma = "mma"
    else:
        mma = "-"
    copies = ttgir.count("async_copy_global_to_local") + ttgir.count("buffer_load_to_local")
    return KernelStats(registers, spill, compiled.metadata.shared, copies, mma,
                       compiled.metadata.num_warps, waves)


# ---------------------------------------------------------------------------------------------
# The launch configurations, per op. Tile sizes are the launchers' own for the target.


def embedding_loss_variants(target: tuple) -> list[Variant]:
    from .embedding_loss.impl import triton as k

    out = []
    for dt, native in (("bf16", True), ("fp16", True), ("fp32", False)):
        for with_dot, shared in ((True, True), (True, False), (False, False)):
            parts = {n: "*fp32" for n in ("SL1_PART", "PP_PART", "DOT_PART", "TT_PART")}
            # Every autotune config of the single-GPU bf16 path (the autotuner compiles them
            # all on the GPU); one config of the others, to keep the compile test short.
            main = dt == "bf16" and shared
            for cfg in k._configs(bwd=False) if main else k._configs(bwd=False)[1:2]:
                bd = cfg.kwargs["BLOCK_D"]
                for bb in (16, 32) if main else (32,):  # B = 8 and B = 32: one tile each
                    # DEFER_ROW_SUMS both ways on the main path where it applies (<= 2,048)
                    defers = (False, True) if main and bb * bd <= 2048 else \
                        (k.DEFER_ROW_SUMS,)
                    for defer in defers:
                        out.append(Variant(
                            f"embedding_loss.fwd[{dt},dot={with_dot},shared={shared},B{bb},"
                            f"D{bd},w{cfg.num_warps},s{cfg.num_stages}"
                            f"{',defer' if defer else ''}]",
                            k._embedding_distill_loss_fwd_kernel,
                            {"P": "*" + dt, "T": "*" + dt, "G": "*" + dt, **parts},
                            ("beta", "inv_beta"),
                            {"WITH_DOT": with_dot, "DOT_NATIVE": native, "SHARED_TILE": shared,
                             "BLOCK_B": bb, "BLOCK_G": bb, "BLOCK_D": bd,
                             "DEFER_SUMS": defer},
                            cfg.num_warps, cfg.num_stages))
            coefs = {n: "*fp32" for n in ("COEF_SL1", "COEF_P", "COEF_C", "OUT", "GRAD_LS",
                                          "G_LOSS", "G_SL1", "G_CON")}
            for cfg in k._configs(bwd=True) if main else k._configs(bwd=True)[:1]:
                bd = cfg.kwargs["BLOCK_D"]
                out.append(Variant(
                    f"embedding_loss.bwd[{dt},dot={with_dot},shared={shared},D{bd},"
                    f"w{cfg.num_warps},s{cfg.num_stages}]",
                    k._embedding_distill_loss_bwd_kernel,
                    {"P": "*" + dt, "T": "*" + dt, "G": "*" + dt, "GRAD": "*" + dt, **coefs},
                    ("beta", "inv_beta"),
                    {"HAS_G_LOSS": True, "HAS_G_SL1": False, "HAS_G_CON": False,
                     "WITH_DOT": with_dot, "DOT_PREC": "ieee" if dt == "fp32" else "tf32",
                     "SHARED_TILE": shared, "BLOCK_B": 32, "BLOCK_G": 32, "BLOCK_D": bd},
                    cfg.num_warps, cfg.num_stages))
    rows_ptrs = {n: "*fp32" for n in ("SL1_PART", "PP_PART", "DOT_PART", "TT_PART", "MASK",
                                      "GMASK", "LOGIT_SCALE", "ROW_OUT", "COEF_SL1", "COEF_P",
                                      "COEF_C")}
    for seed_mode in (True, False):
        for with_dot in (True, False):
            # an H100's 528 chunks; 16 (B <= 16) and 32 candidates, and 256 (8 GPUs x 32)
            for gc in (16, 32, 256):
                bc, warps, stages = k.rows_kernel_tiles(528, gc)
                out.append(Variant(
                    f"embedding_loss.rows[seed={seed_mode},dot={with_dot},GC{gc}]",
                    k._embedding_distill_loss_rows_kernel, rows_ptrs,
                    ("contrastive_weight", "max_logit_scale"),
                    {"SEED_MODE": seed_mode, "WITH_DOT": with_dot, "BLOCK_C": bc,
                     "BLOCK_GC": gc, "BLOCK_BM": 32, "NUM_STAGES": stages}, warps, 1))
    out.append(Variant("embedding_loss.total", k._embedding_distill_loss_total_kernel,
                       {n: "*fp32" for n in ("ROW_OUT", "OUT", "LOSS", "SL1", "CON")}, (),
                       {"BLOCK": 32}))
    return out


def linear_cross_entropy_variants(target: tuple) -> list[Variant]:
    from .linear_cross_entropy.impl import triton_kernels as k
    from .linear_cross_entropy.impl.triton import GPU_BLOCKS, ROCM_BLOCKS
    from .linear_cross_entropy.impl.triton_vocab_slabs import slab_h_tile

    blk = GPU_BLOCKS if target[0] == "cuda" else ROCM_BLOCKS
    launch = dict(num_warps=blk["num_warps"], num_stages=blk["num_stages"])
    dw_launch = dict(num_warps=blk.get("dw_warps", blk["num_warps"]),
                     num_stages=blk.get("dw_stages", blk["num_stages"]))
    ints = {"ORDER": "*i32", "LABELS": "*i64", "COUNT": "*i32"}
    scalars = ("softcap", "label_smoothing", "z_loss_weight")
    out = []
    for dt, native in (("bf16", True), ("fp32", False)):
        for bias, cap in ((True, True), (False, False)):
            tensors = {"HID": "*" + dt, "W": "*" + dt, "BIAS": "*" + dt}
            parts = {n: "*fp32" for n in ("PART_M", "PART_S", "PART_ZY", "PART_SZ", "PART_BEST")}
            tiles = {"BLOCK_N": blk["n"], "BLOCK_V": blk["v"], "BLOCK_K": blk["k"]}
            flags = {"HAS_BIAS": bias, "HAS_SOFTCAP": cap, "DOT_NATIVE": native}
            tag = f"{dt},bias={bias},softcap={cap}"
            out.append(Variant(f"lce.fwd[{tag},smoothing={cap}]", k._lce_fwd_kernel,
                               {**tensors, **ints, **parts, "PART_IDX": "*i32"}, ("softcap",),
                               {**flags, **tiles, "HAS_SMOOTHING": cap}, **launch))
            dl = {**tensors, **ints, "LSE": "*fp32", "GRAD_LOSS": "*fp32", "DLOGITS": "*" + dt}
            out.append(Variant(f"lce.dlogits[{tag},zero_past={cap}]", k._lce_dlogits_kernel,
                               dl, scalars, {**flags, **tiles, "ZERO_PAST_COUNT": cap}, **launch))
            # grad_in_forward: the logits themselves (with and without the zeroing branch)
            out.append(Variant(f"lce.logits[{tag},zero_past={not cap}]", k._lce_dlogits_kernel,
                               dl, scalars, {**flags, **tiles, "ZERO_PAST_COUNT": not cap,
                                             "WRITE_LOGITS": True}, **launch))
            rows_ptrs = {"LOGITS": "*" + dt, **ints, "LSE": "*fp32", "LOSS": "*fp32",
                         "CORRECT": "*i8", "BIAS": "*" + dt}
            out.append(Variant(f"lce.rows_grad[{dt},softcap={cap},smoothing={cap}]",
                               k._lce_rows_grad_kernel, rows_ptrs, scalars,
                               {"HAS_SOFTCAP": cap, "HAS_SMOOTHING": cap,
                                "BLOCK_V": blk["row_v"]},
                               num_warps=blk["row_warps"]))
            if native:  # the BLAS schedule (half operands only): raw GEMM logits, rows zeroed;
                # the kernel adds a bias only when its dtype is not the weight's (fp32)
                out.append(Variant(f"lce.rows_grad[{dt},raw,bias={bias},softcap={cap}]",
                                   k._lce_rows_grad_kernel, {**rows_ptrs, "BIAS": "*fp32"},
                                   scalars,
                                   {"HAS_SOFTCAP": cap, "HAS_SMOOTHING": cap,
                                    "BLOCK_V": blk["row_v"], "RAW_LOGITS": True,
                                    "HAS_BIAS": bias, "ZERO_PAST_COUNT": True},
                                   num_warps=blk["row_warps"]))
        mm = {"BLOCK_M": blk["m"], "BLOCK_H": blk["h"], "BLOCK_K": blk["k"]}
        # grad_hidden in the operand dtype (backward) and in fp32 (grad_in_forward's unit grad)
        for grad_dt in sorted({dt, "fp32"}):
            out.append(Variant(f"lce.dhidden[{dt}->{grad_dt}]", k._lce_dhidden_kernel,
                               {"DLOGITS": "*" + dt, "W": "*" + dt, **ints,
                                "GRAD_HID": "*" + grad_dt},
                               (), {"DOT_NATIVE": native, **mm}, **launch))
        # a frozen head's grad_hidden (rows schedule, narrow H tile)
        out.append(Variant(f"lce.dhidden[{dt}->{dt},narrow]", k._lce_dhidden_kernel,
                           {"DLOGITS": "*" + dt, "W": "*" + dt, **ints, "GRAD_HID": "*" + dt},
                           (), {"DOT_NATIVE": native,
                                **{**mm, "BLOCK_H": blk.get("narrow_h", blk["h"])}}, **launch))
        # the vocab schedule's slabs (own H tile, two halves): first (to the fp32 sum), middle
        # (from and to it), last (from it to the rows)
        slab_mm = {**mm, "BLOCK_H": slab_h_tile(blk, native)}
        for acc_in, acc_out in ((False, True), (True, True), (True, False)):
            out.append(Variant(f"lce.dhidden[{dt},slab,acc_in={acc_in},acc_out={acc_out}]",
                               k._lce_dhidden_slab_kernel,
                               {"DLOGITS": "*" + dt, "W": "*" + dt, **ints,
                                "GRAD_HID": "*" + dt, "ACC": "*fp32"},
                               (), {"DOT_NATIVE": native, "ACC_IN": acc_in,
                                    "ACC_OUT": acc_out, **slab_mm}, **launch))
        dw_mm = {"BLOCK_M": blk.get("dw_m", blk["m"]), "BLOCK_H": blk.get("dw_h", blk["h"]),
                 "BLOCK_K": blk.get("dw_k", blk["k"])}
        # rows schedule: fp32 accumulator (first chunk, later chunks); vocab schedule: one
        # pass over all rows, stored in the weight's dtype
        for acc, gw_dt in ((False, "fp32"), (True, "fp32"), (False, dt)):
            out.append(Variant(f"lce.dweight[{dt}->{gw_dt},accumulate={acc}]",
                               k._lce_dweight_kernel,
                               {"DLOGITS": "*" + dt, "HID_ROWS": "*" + dt, "COUNT": "*i32",
                                "GRAD_W": "*" + gw_dt, "GRAD_B": "*fp32"}, (),
                               {"ACCUMULATE": acc, "HAS_WEIGHT_GRAD": True, "HAS_BIAS": acc,
                                "DOT_NATIVE": native, **dw_mm}, **dw_launch))
    parts = {n: "*fp32" for n in ("PART_M", "PART_S", "PART_ZY", "PART_SZ", "PART_BEST", "LSE",
                                  "LOSS")}
    out.append(Variant("lce.combine", k._lce_combine_kernel,
                       {**parts, "PART_IDX": "*i32", **ints, "CORRECT": "*i8"},
                       ("label_smoothing", "z_loss_weight"), {"BLOCK": 128}))
    return out


def perceiver_variants(target: tuple) -> list[Variant]:
    from .perceiver.impl import triton as k

    out = []
    for dt in ("bf16", "fp32"):
        out.append(Variant(f"perceiver.layer_norm_fwd[{dt}]", k._layer_norm_fwd_kernel,
                           {"X": "*" + dt, "W": "*" + dt, "B": "*" + dt, "Y": "*" + dt,
                            "MEAN": "*fp32", "RSTD": "*fp32"}, ("eps",),
                           {"BLOCK_M": 1, "BLOCK_N": 4096}))
        out.append(Variant(f"perceiver.layer_norm_bwd[{dt}]", k._layer_norm_bwd_kernel,
                           {"DY": "*" + dt, "X": "*" + dt, "W": "*" + dt, "MEAN": "*fp32",
                            "RSTD": "*fp32", "DX": "*" + dt, "DW_PART": "*fp32",
                            "DB_PART": "*fp32"}, (), {"BLOCK_M": 2, "BLOCK_N": 2048}))
        out.append(Variant(f"perceiver.gelu_fwd[{dt}]", k._gelu_fwd_kernel,
                           {"X": "*" + dt, "Y": "*" + dt}, (), {"BLOCK": 1024}))
        out.append(Variant(f"perceiver.gelu_bwd[{dt}]", k._gelu_bwd_kernel,
                           {"DY": "*" + dt, "X": "*" + dt, "DX": "*" + dt}, (), {"BLOCK": 1024}))
    # Under CUDA autocast: a bf16 input, fp32 weights and output (fp32_out), fp32 gradient in.
    out.append(Variant("perceiver.layer_norm_fwd[bf16->fp32]", k._layer_norm_fwd_kernel,
                       {"X": "*bf16", "W": "*fp32", "B": "*fp32", "Y": "*fp32",
                        "MEAN": "*fp32", "RSTD": "*fp32"}, ("eps",),
                       {"BLOCK_M": 1, "BLOCK_N": 4096}))
    out.append(Variant("perceiver.layer_norm_bwd[fp32->bf16]", k._layer_norm_bwd_kernel,
                       {"DY": "*fp32", "X": "*bf16", "W": "*fp32", "MEAN": "*fp32",
                        "RSTD": "*fp32", "DX": "*bf16", "DW_PART": "*fp32",
                        "DB_PART": "*fp32"}, (), {"BLOCK_M": 2, "BLOCK_N": 2048}))
    return out


def rotary_embedding_variants(target: tuple) -> list[Variant]:
    from .rotary_embedding.impl import triton as k

    out = []
    for dt in ("bf16", "fp32"):
        for backward in (False, True):  # Llama-3: 32 query heads, 8 key heads, head_dim 128
            out.append(Variant(
                f"rotary_embedding.{'bwd' if backward else 'fwd'}[{dt}]",
                k._rotary_embedding_kernel,
                {n: "*" + dt for n in ("Q", "K", "COS", "SIN", "QO", "KO")}, (),
                {"BLOCK_HQ": 32, "BLOCK_HK": 8, "BLOCK_HALF": 64, "BACKWARD": backward},
                num_warps=4))  # the launcher's choice at 32 x 64 elements per half
    return out


def silu_mul_variants(target: tuple) -> list[Variant]:
    from .silu_mul.impl import triton as k

    out = []
    for dt in ("bf16", "fp32"):
        out.append(Variant(f"silu_mul.fwd[{dt}]", k._silu_mul_fwd_kernel,
                           {"G": "*" + dt, "U": "*" + dt, "Y": "*" + dt}, (),
                           {"BLOCK": k.BLOCK}))
        out.append(Variant(f"silu_mul.bwd[{dt}]", k._silu_mul_bwd_kernel,
                           {n: "*" + dt for n in ("DY", "G", "U", "DG", "DU")}, (),
                           {"BLOCK": k.BLOCK}))
    return out


def all_variants(target: tuple) -> list[Variant]:
    return (embedding_loss_variants(target) + linear_cross_entropy_variants(target)
            + perceiver_variants(target) + rotary_embedding_variants(target)
            + silu_mul_variants(target))
