#!/usr/bin/env bash
# The one script a GPU window runs (well under 8 minutes): GPU tests, ceilings, benchmarks, table.
#
#   OLAVLM_GIT_SHA=<sha> bash benchmarks/gpu/run.sh    (the sha as benchmarks/common.py
#   writes it, computed where .git is: python -c "from benchmarks.common import _git_sha;
#   print(_git_sha())"; the device's copy of the tree has no .git)
#
# Writes CSV records under benchmarks/results/ (or $OLAVLM_RESULTS_DIR) and, when $OUT is set
# (the lent-GPU tool), copies the CSVs there after every stage (a call killed at its time
# limit still brings back what the finished stages wrote). Each stage has its own time limit,
# cut to what is left of OLAVLM_BUDGET_S (default 540 s: the tool's 600 s per call, less the
# report), and a failing stage does not stop the next, so one window yields as much as it can.
# On a machine without CUDA it runs as a dry run (GPU tests skip, tiny benchmark shapes), and
# its records go to $OUT/results (not into the checked-in history) unless OLAVLM_RESULTS_DIR
# says otherwise.
#
# Baselines missing from the GPU image (liger-kernel, cut-cross-entropy) travel as wheels in
# .whl/ (git-ignored; name it in the device tool's `carry`). Prepare them here with e.g.
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_17_x86_64 -d .whl liger-kernel==0.8.5
set -u
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
OUT_DIR=${OUT:-/tmp/olavlm-gpu-run}
PY=${PYTHON:-python3}
# The GPU torch sees (its name as the records write it), or "" for a dry run; nvidia-smi alone
# would miss a ROCm card and could print a driver error as a name.
GPU_NAME=$($PY -c "import torch; print(torch.cuda.get_device_name() if \
torch.cuda.is_available() else '')" 2>/dev/null | tail -n 1)
if [ -n "$GPU_NAME" ]; then
  export OLAVLM_RESULTS_DIR=${OLAVLM_RESULTS_DIR:-$PWD/benchmarks/results}
else  # a dry run: CPU rows stay out of the history (benchmarks/common.py keeps them here)
  export OLAVLM_RESULTS_DIR=${OLAVLM_RESULTS_DIR:-$OUT_DIR/results}
fi
mkdir -p "$OUT_DIR" "$OLAVLM_RESULTS_DIR"
BUDGET=${OLAVLM_BUDGET_S:-540}
case "$BUDGET" in ''|*[!0-9]*) echo "OLAVLM_BUDGET_S must be whole seconds, got '$BUDGET'" >&2
  exit 2;; esac
LOG="$OUT_DIR/run.log"
T0=$(date +%s)
START_MARK=$(mktemp)  # CSVs newer than this are this run's
trap 'rm -f "$START_MARK"' EXIT

# OLAVLM_STAGES picks stages (default below), e.g. OLAVLM_STAGES="bench gpu_tests";
# OLAVLM_BENCH_K narrows the benchmarks (a pytest -k expression, e.g. "triton").
# bench_compile (torch.compile baselines) only when asked for: compiling eats the window.
# The default is what is still unmeasured or changed since the last window (docs/PERF.md, "Open
# predictions"): the embedding loss with its forward's column blocks interleaved over the
# programs (bench: the issue's fwd+bwd GB/s against copy) and every GPU test (run 7's stage
# ended after 14 of 32). The second call PERF.md suggests runs profile (interleaved against
# contiguous), bench_lce (the BLAS schedule's peak without autograd's zero gradients, the
# frozen head's larger chunks) and bench_step (the padded LM-head GEMMs in the step, the
# reference and float8 modes).
# Opt-in: profile profile_lce bench_lce bench_step bench_perceiver bench_rope bench_silu_mul
# bench_teachers bench_compile ceilings ncu.
STAGES=${OLAVLM_STAGES:-"bench gpu_tests"}

copy_results() {  # this run's CSVs to $OUT (the device tool brings back at most 8 files)
  [ "$(cd "$OLAVLM_RESULTS_DIR" && pwd -P)" = "$(cd "$OUT_DIR" && pwd -P)" ] && return 0
  find "$OLAVLM_RESULTS_DIR" -maxdepth 1 -name '*.csv' -newer "$START_MARK" \
    -exec cp {} "$OUT_DIR"/ \;
}

stage() {  # stage NAME SECONDS CMD...: run with a time limit, log it, never abort the script
  local name=$1 limit=$2
  shift 2
  case " $STAGES " in *" $name "*) ;; *) echo "== $name: skipped (OLAVLM_STAGES)" | tee -a "$LOG"; return 0;; esac
  local left=$(( BUDGET - ($(date +%s) - T0) ))
  if [ "$left" -lt 20 ]; then
    echo "== $name: skipped (${left}s left of OLAVLM_BUDGET_S=${BUDGET})" | tee -a "$LOG"
    return 0
  fi
  case "$limit" in ''|*[!0-9]*) echo "== $name: limit '$limit' is not whole seconds; ${left}s"
    limit=$left;; esac
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== [$(( $(date +%s) - T0 ))s] $name (limit ${limit}s)" | tee -a "$LOG"
  timeout "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  echo "== $name: rc=$rc" | tee -a "$LOG"
  tail -n 4 "$LOG" | grep -E "passed|failed|error|skipped" || true
  copy_results
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  $PY -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', \
torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, \
'hip', torch.version.hip)"
  echo "git_sha ${OLAVLM_GIT_SHA:-unknown}"
} >>"$LOG" 2>&1
head -n 4 "$LOG"

if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/olavlm-site .whl/*.whl >>"$LOG" 2>&1 && \
    export PYTHONPATH=/tmp/olavlm-site${PYTHONPATH:+:$PYTHONPATH}
fi
# The baselines' versions (the records name ours; these are what they were compared with).
$PY -c "
import importlib.metadata as m
for name in ('liger-kernel', 'torchao', 'cut-cross-entropy', 'transformers'):
    try: print('baseline', name, m.version(name))
    except m.PackageNotFoundError: print('baseline', name, 'not installed')
" 2>&1 | tee -a "$LOG"

PYTEST=($PY -m pytest -q -p no:cacheprovider)
# The default stages' limits add up to ~8.5 minutes (bench 90, gpu_tests 420 s, cut to what
# OLAVLM_BUDGET_S leaves); a typical run takes less. Pick stages with OLAVLM_STAGES (the loader benchmark, bench_data.py,
# is CPU-bound and not run here). The GPU tests compile every kernel variant (autotuning
# included) and train the demo for 40 steps: ~5-6 minutes for all 53 (run 7 ran 14 in ~270 s).
if [ -n "$GPU_NAME" ] && [ -z "${OLAVLM_STAGES:-}" ] && \
    grep -q ",$GPU_NAME," benchmarks/results/ceiling.csv 2>/dev/null; then
  STAGES=${STAGES/ceilings/}  # measured before on this card: spend the seconds elsewhere
  echo "== ceilings: already measured on $GPU_NAME (benchmarks/results/ceiling.csv)" | tee -a "$LOG"
fi
stage ceilings 30 $PY benchmarks/gpu/ceilings.py
# Ours and the eager baseline first: the numbers the issues' goals are judged on.
stage bench "${OLAVLM_BENCH_LIMIT:-90}" "${PYTEST[@]}" benchmarks/bench_embedding_loss.py \
  --benchmark-only -k "${OLAVLM_BENCH_K:-not reference_compile}" \
  --benchmark-json="$OUT_DIR/bench.json"
# linear_cross_entropy, "quick" grid (OLAVLM_LCE_PRESET=full for all 24 cases x providers).
stage bench_lce "${OLAVLM_LCE_LIMIT:-100}" "${PYTEST[@]}" \
  benchmarks/bench_linear_cross_entropy.py --benchmark-only -k "${OLAVLM_LCE_K:-not compile}"
stage bench_perceiver "${OLAVLM_PERCEIVER_LIMIT:-90}" "${PYTEST[@]}" \
  benchmarks/bench_perceiver.py --benchmark-only
# RoPE on q and k at the step's shapes: eager (HF's formula), liger-kernel, ours (~15 s).
stage bench_rope "${OLAVLM_ROPE_LIMIT:-40}" $PY benchmarks/bench_rotary_embedding.py \
  --providers eager,liger,ours
# SwiGLU's silu(gate) * up at the step's shapes: eager, liger-kernel, ours, ours in place
# (~55 s in run 6 without the last).
stage bench_silu_mul "${OLAVLM_SILU_LIMIT:-120}" $PY benchmarks/bench_silu_mul.py \
  --providers eager,liger,ours,ours_inplace
# One OLA-VLM pre-training step per mode (a default stage): the
# seed-faithful step (reference math + per-image online teachers) vs ours with cached or batched
# online targets, inline or on a side stream. OLAVLM_STEP_PROVIDERS picks modes (default below:
# ~110-160 s on an H200 at
# llama3_8b B=8); add fused_cached_compile / fused_cached_float8 (+ ~60-90 s each for building
# and compiling; raise OLAVLM_STEP_LIMIT), reference, fused_cached_ac, or "all".
# Default llama3_8b at B=8 (~55 GB on the seed path: prefer an H200; llama3_2l is the same
# widths with 4 blocks); OLAVLM_STEP_PRESET / OLAVLM_STEP_BATCH (e.g. "8,16") override.
# Without CUDA the script picks its tiny preset (dry run). --profile: one more fused_cached step
# under torch.profiler, device time per kind of kernel (what keeps the step from 45% MFU);
# OLAVLM_STEP_PROFILE="" turns it off.
stage bench_step "${OLAVLM_STEP_LIMIT:-140}" $PY benchmarks/bench_step.py \
  ${OLAVLM_STEP_PRESET:+--preset "$OLAVLM_STEP_PRESET"} --batch "${OLAVLM_STEP_BATCH:-8}" \
  --providers "${OLAVLM_STEP_PROVIDERS:-seed,fused_cached,fused_online,fused_online_side}" \
  --profile "${OLAVLM_STEP_PROFILE-fused_cached}"
# Teachers: per-image vs batched vs cache reads (opt-in: OLAVLM_STAGES="... bench_teachers").
# (its default preset: real model sizes on a GPU, tiny ones on the CPU dry run)
stage bench_teachers "${OLAVLM_TEACHERS_LIMIT:-120}" $PY benchmarks/bench_teachers.py
# Per-kernel device time of the embedding loss (its fixed forward cost; docs/PERF.md), then
# its forward kernel under each autotune config (which tile, if any, reaches the bandwidth),
# with its column blocks interleaved or contiguous (INTERLEAVE_CHUNKS), and 2-16 programs per SM.
stage profile "${OLAVLM_PROFILE_LIMIT:-70}" $PY benchmarks/gpu/profile_embedding_loss.py
# Hardware counters (Nsight Compute) of the memory-bound kernels under their bandwidth: the
# embedding loss's forward/backward/rows kernels at seg B=32 and depth B=8, the LM head's row
# kernel (benchmarks/gpu/ncu_kernels.py says why). Opt-in, ~1-2 minutes; without ncu (the CPU
# dry run) the workload runs unprofiled.
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null \
  | head -n 1)
NCU_CMD=()
[ -n "$NCU" ] && NCU_CMD=("$NCU" --profile-from-start off --clock-control none
  --kernel-name "regex:embedding_distill_loss|lce_rows_grad" --section SpeedOfLight
  --section MemoryWorkloadAnalysis --section WarpStateStats --section SchedulerStats
  --section Occupancy --section LaunchStats)
stage ncu "${OLAVLM_NCU_LIMIT:-150}" "${NCU_CMD[@]}" $PY benchmarks/gpu/ncu_kernels.py
# linear_cross_entropy: per-kernel time and TFLOP/s per tile config, and host vs wall time.
# Default: today's tiles (the backward in vocabulary slabs, grad_hidden as two halves of a
# 128 x 256 tile) against slab_h=128, the row-chunk schedule with its fp32 grad_weight
# accumulator ("rows"), grad_in_forward (3 GEMM passes instead of 4) and the BLAS schedule
# ("blas": the same with cuBLAS GEMMs, every row multiplied as no bound is given), at 0% and
# 90% ignored; dw_torch, grad_fwd_dw_torch and the dW tile sweep by name,
# OLAVLM_PROFILE_LCE_CONFIGS=all for the whole sweep (raise OLAVLM_PROFILE_LCE_LIMIT to ~200).
LCE_CONFIGS=${OLAVLM_PROFILE_LCE_CONFIGS:-current,blas,slab_h128,rows,grad_fwd}
[ "$LCE_CONFIGS" = all ] && LCE_CONFIGS=""
stage profile_lce "${OLAVLM_PROFILE_LCE_LIMIT:-90}" $PY benchmarks/gpu/profile_lce.py \
  ${LCE_CONFIGS:+--configs "$LCE_CONFIGS"}
# The kernels first, then the model, the whole training job (passed in run 6) last. -vv (with
# PYTEST's -q: verbose) names each test as it starts and "times" prints how long it took, so a
# stage cut by its limit still says which passed, which failed and where the time went (run 7
# was cut during the BLAS schedule's Llama-3 test, 14 of 32 done, with no timings). Where
# pytest-timeout is installed (the GPU image has it), one test may take at most
# OLAVLM_TEST_TIMEOUT seconds (default 120: the training job takes longest): a stuck test
# fails and the rest still run.
TEST_TIMEOUT=()
$PY -c "import pytest_timeout" 2>/dev/null && TEST_TIMEOUT=(--timeout "${OLAVLM_TEST_TIMEOUT:-120}")
# OLAVLM_GPU_TESTS picks the folders (or files), e.g. "tests/models tests/teachers tests/train"
# for a second call when the first ran out of time in tests/kernels.
# shellcheck disable=SC2086  # (word splitting of the folder list is intended)
stage gpu_tests "${OLAVLM_TESTS_LIMIT:-420}" "${PYTEST[@]}" -vv -o console_output_style=times \
  "${TEST_TIMEOUT[@]}" --durations 12 -m gpu \
  ${OLAVLM_GPU_TESTS:-tests/kernels tests/models tests/teachers tests/benchmarks tests/train} \
  --deselect tests/kernels/test_triton_compiles_for_gpus.py
# torch.compile baselines: slowest to set up (compiles), so last.
stage bench_compile 45 "${PYTEST[@]}" benchmarks/bench_embedding_loss.py --benchmark-only \
  -k "reference_compile"

copy_results
echo "== done in $(( $(date +%s) - T0 ))s; results in $OLAVLM_RESULTS_DIR and $OUT_DIR"
$PY benchmarks/report.py --results "$OLAVLM_RESULTS_DIR" --latest
