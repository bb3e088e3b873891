# Shared benchmark harness: timing, memory, environment capture and the CSV results history.
"""Benchmark harness shared by every op's benchmark script.

Import it as ``benchmarks.common`` from the repo root, or as ``common`` from a script that lives
in ``benchmarks/`` (Python puts the script's folder first on ``sys.path``).

Typical use::

    timing = do_bench(lambda: op(x), setup=lambda: x.grad.zero_())
    rec = make_record(op="embedding_loss", provider="triton", mode="fwd", shape="8192x4096",
                      dtype="bfloat16", timing=timing, num_bytes=moved_bytes)
    append_records([rec])          # -> benchmarks/results/embedding_loss.csv

The CSV files are an append-only history: rows are never rewritten, and a file whose header does
not match ``Record``'s fields is refused rather than silently mixed.
"""
from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import functools
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

__all__ = [
    "DEFAULT_COLUMNS",
    "FIELDNAMES",
    "Record",
    "Timing",
    "append_records",
    "is_oom",
    "bench_device",
    "bench_reps",
    "finish_pytest_benchmark",
    "do_bench",
    "environment",
    "format_table",
    "gbps",
    "make_record",
    "peak_memory_delta",
    "read_records",
    "results_dir",
    "run_case_or_skip",
    "run_cli",
    "tflops",
    "wall_time",
]

REPO_ROOT = Path(__file__).resolve().parent.parent

# 256 MiB is several times the L2 of current GPUs (H100: 50 MB, H200: 60 MB, MI300X: 256 MB of
# Infinity Cache), so writing it evicts whatever the previous call left in cache.
_FLUSH_BYTES = 256 * 2**20
_flush_buffers: dict[torch.device, torch.Tensor] = {}
# A GPU spin before each timed call keeps the GPU busy while Python enqueues the start event, fn
# and the end event, so host launch overhead is not timed. 4M cycles is ~2 ms at 2 GHz: longer
# than the host needs to enqueue an eager loss with dozens of small kernels.
_SPIN_CYCLES = 4_000_000


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


class Timing(NamedTuple):
    """Per-call latency summary in milliseconds; n is the number of timed calls."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    n: int


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type not in ("cuda", "cpu"):
        # Other backends need their own synchronisation; timing them with perf_counter would
        # only measure launch overhead.
        raise ValueError(f"do_bench supports 'cuda' and 'cpu' devices, got {dev}")
    return dev


def _quantile(sorted_vals: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default), so p20 <= median <= p80 always holds."""
    pos = q * (len(sorted_vals) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def _summarize(times_ms: Sequence[float]) -> Timing:
    vals = sorted(times_ms)
    return Timing(_quantile(vals, 0.5), _quantile(vals, 0.2), _quantile(vals, 0.8), len(vals))


def _flush_buffer(dev: torch.device) -> torch.Tensor:
    """The cached 256 MiB scratch buffer for `dev` (allocated on first use, then reused)."""
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    buf = _flush_buffers.get(dev)
    if buf is None:
        buf = torch.empty(_FLUSH_BYTES, dtype=torch.int8, device=dev)
        _flush_buffers[dev] = buf
    return buf


def _bench_cuda(fn, setup, warmup: int, rep: int, dev: torch.device, flush_l2: bool) -> Timing:
    with torch.cuda.device(dev):
        flush = _flush_buffer(dev) if flush_l2 else None
        for _ in range(warmup):
            if setup is not None:
                setup()
            fn()
        # Drain the warm-up work so the first timed call does not queue behind it.
        torch.cuda.synchronize()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
        for start, end in zip(starts, ends, strict=True):
            if setup is not None:
                setup()
            if flush is not None:
                flush.zero_()  # after setup, so setup's writes are evicted too
            # A GPU spin keeps the device busy while Python enqueues the start event, fn and the
            # end event, so only device time is measured -- as inside a training step, where
            # the host runs ahead of the GPU. It touches no memory: the cache state is kept.
            torch.cuda._sleep(_SPIN_CYCLES)
            start.record()
            fn()
            end.record()
        # One sync at the end: syncing per call would add host latency between kernels.
        torch.cuda.synchronize()
        return _summarize([s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)])


def _bench_cpu(fn, setup, warmup: int, rep: int) -> Timing:
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    times_ms = []
    for _ in range(rep):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        times_ms.append((time.perf_counter() - t0) * 1e3)
    return _summarize(times_ms)


def do_bench(
    fn: Callable[[], Any],
    *,
    setup: Callable[[], Any] | None = None,
    warmup: int = 5,
    rep: int = 50,
    device: str | torch.device | None = None,
    flush_l2: bool = True,
) -> Timing:
    """Time `fn()` and return the median / p20 / p80 of `rep` per-call times in milliseconds.

    `setup()` runs untimed before every call (warm-up calls too, so that a fn which consumes its
    inputs stays valid). On CUDA each call is timed with its own pair of CUDA events recorded
    around fn only, and with `flush_l2` a 256 MiB buffer is overwritten before each call so fn
    starts with a cold L2, as it would inside a training step; a GPU spin before each call keeps
    host launch overhead out of the timing (measured separately by `wall_time`). On CPU,
    perf_counter is used and there is no flush.
    """
    if rep < 1 or warmup < 0:
        raise ValueError(f"need rep >= 1 and warmup >= 0, got rep={rep}, warmup={warmup}")
    dev = _resolve_device(device)
    if dev.type == "cuda":
        return _bench_cuda(fn, setup, warmup, rep, dev, flush_l2)
    return _bench_cpu(fn, setup, warmup, rep)


def wall_time(fn: Callable[[], Any], *, setup=None, rep: int = 20, device=None) -> float:
    """Median host wall time of `fn()` in ms, synchronizing after each call.

    This is what an eager caller that waits on the result sees: device time plus the host's
    launch overhead whenever the host, not the device, is the bottleneck.
    """
    dev = _resolve_device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    times = []
    for _ in range(rep):
        if setup is not None:
            setup()
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def bench_device() -> str:
    """Where the microbenchmarks run: the GPU when there is one, else the CPU (smoke runs)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def bench_reps(gpu: tuple[int, int] = (5, 50)) -> tuple[int, int]:
    """(warm-up, timed) calls: real repetitions on a GPU; one untimed-quality call on CPU."""
    return gpu if torch.cuda.is_available() else (0, 1)


def finish_pytest_benchmark(benchmark, record: Record, step, setup, rep: int,
                            fields: Sequence[str] = ("ms", "gbps", "tflops", "peak_mib")) -> None:
    """Append ``record`` to the history and let pytest-benchmark time a few synchronized calls.

    The record's numbers come from ``do_bench`` (device time); pytest-benchmark's own table
    shows host wall time of ``step`` plus a synchronize, as a cross-check.
    """
    append_records([record])
    benchmark.extra_info.update({k: getattr(record, k) for k in fields})
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    benchmark.pedantic(lambda: (step(), sync()), setup=setup, rounds=max(rep // 10, 1),
                       warmup_rounds=0)


def is_oom(err: BaseException) -> bool:
    """Whether ``err`` is the device running out of memory: torch's OutOfMemoryError, or a
    library (cuBLAS) failing to allocate, which arrives as a plain RuntimeError."""
    text = str(err)
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in text or \
        "ALLOC_FAILED" in text


def peak_memory_delta(
    fn: Callable[[], Any],
    *,
    device: str | torch.device | None = None,
    setup: Callable[[], Any] | None = None,
) -> int | None:
    """Bytes allocated at the peak of one `fn()` call above what was allocated just before it.

    Counts the PyTorch caching allocator only (not cuBLAS workspaces or other libraries). Returns
    None on CPU, where torch keeps no allocation statistics.
    """
    dev = _resolve_device(device)
    if dev.type != "cuda":
        return None
    with torch.cuda.device(dev):
        if setup is not None:
            setup()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        # The peak includes fn's outputs: they were allocated during the call.
        peak = torch.cuda.max_memory_allocated()
    return peak - before


def gbps(num_bytes: float, ms: float) -> float:
    """Throughput in GB/s (1e9 bytes per second, as GPU datasheets count)."""
    if ms <= 0:
        raise ValueError(f"ms must be positive, got {ms}")
    return num_bytes / (ms * 1e-3) / 1e9


def tflops(num_flops: float, ms: float) -> float:
    """Compute rate in TFLOP/s (1e12 floating-point operations per second)."""
    if ms <= 0:
        raise ValueError(f"ms must be positive, got {ms}")
    return num_flops / (ms * 1e-3) / 1e12


# --------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _git_sha_from_repo() -> str:
    """Short HEAD sha of the checkout with "-dirty" when the tree differs from it (changed or
    untracked files: the measured code is then not the commit's), or 'unknown' (no git, no
    .git, no commit yet)."""

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=10, check=False)

    try:
        head, status = git("rev-parse", "--short=12", "HEAD"), git("status", "--porcelain")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    sha = head.stdout.strip()
    if head.returncode != 0 or not sha:
        return "unknown"
    return sha + ("-dirty" if status.returncode == 0 and status.stdout.strip() else "")


def _git_sha() -> str:
    # The GPU machine gets a copy of the tree without .git, so the caller passes the sha in.
    return os.environ.get("OLAVLM_GIT_SHA") or _git_sha_from_repo()


def _triton_version() -> str:
    try:
        import triton
    except Exception:  # noqa: BLE001 - a broken triton install must not stop a benchmark
        return ""
    return getattr(triton, "__version__", "")


@functools.lru_cache(maxsize=1)
def _static_environment() -> dict[str, str]:
    """The parts of environment() that cannot change within one process."""
    cuda = torch.cuda.is_available()
    return {
        "device": "cuda" if cuda else "cpu",
        "gpu_name": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "triton": _triton_version(),
        "cuda": torch.version.cuda or getattr(torch.version, "hip", None) or "",
        "python": platform.python_version(),
        "hostname": socket.gethostname(),
    }


def environment() -> dict[str, str]:
    """Where a measurement was taken: device, GPU, library versions, git sha, host."""
    env = dict(_static_environment())
    env["git_sha"] = _git_sha()
    return env


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Record:
    """One row of a results CSV. Field order is the CSV column order: append new fields last."""

    timestamp: str
    git_sha: str
    op: str
    provider: str
    mode: str
    shape: str
    dtype: str
    ms: float
    ms_p20: float
    ms_p80: float
    gbps: float | None
    tflops: float | None
    bytes: int | None
    flops: int | None
    peak_mib: float | None
    extra_mib: float | None
    device: str
    gpu_name: str
    torch: str
    triton: str
    cuda: str
    note: str = ""


FIELDNAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Record))
_INT_FIELDS = frozenset({"bytes", "flops"})
_FLOAT_FIELDS = frozenset(
    {"ms", "ms_p20", "ms_p80", "gbps", "tflops", "peak_mib", "extra_mib"}
)


def _shape_str(shape: str | Sequence[int]) -> str:
    return shape if isinstance(shape, str) else "x".join(str(int(d)) for d in shape)


def _dtype_str(dtype: str | torch.dtype) -> str:
    # 'torch.bfloat16' -> 'bfloat16', so hand-written and torch dtypes group together.
    return str(dtype).removeprefix("torch.")


def _mib(num_bytes: int | None) -> float | None:
    return None if num_bytes is None else num_bytes / 2**20


def make_record(
    *,
    op: str,
    provider: str,
    mode: str,
    shape: str | Sequence[int],
    dtype: str | torch.dtype,
    timing: Timing,
    num_bytes: int | None = None,
    num_flops: int | None = None,
    peak_bytes: int | None = None,
    extra_bytes: int | None = None,
    note: str = "",
) -> Record:
    """Build a Record from a Timing, filling the environment fields and GB/s / TFLOP/s.

    `shape` may be a string or a sequence of ints (joined as '8192x4096'); `dtype` may be a
    torch.dtype. `num_bytes` / `num_flops` are the bytes moved and flops done by ONE call;
    GB/s and TFLOP/s are derived from them and the median time.
    """
    env = environment()
    ms = timing.median_ms
    return Record(
        timestamp=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds"),
        git_sha=env["git_sha"],
        op=op,
        provider=provider,
        mode=mode,
        shape=_shape_str(shape),
        dtype=_dtype_str(dtype),
        ms=ms,
        ms_p20=timing.p20_ms,
        ms_p80=timing.p80_ms,
        gbps=None if num_bytes is None else gbps(num_bytes, ms),
        tflops=None if num_flops is None else tflops(num_flops, ms),
        bytes=num_bytes,
        flops=num_flops,
        peak_mib=_mib(peak_bytes),
        extra_mib=_mib(extra_bytes),
        device=env["device"],
        gpu_name=env["gpu_name"],
        torch=env["torch"],
        triton=env["triton"],
        cuda=env["cuda"],
        note=note,
    )


# --------------------------------------------------------------------------------------------
# CSV history
# --------------------------------------------------------------------------------------------


def results_dir() -> Path:
    """OLAVLM_RESULTS_DIR if set (the GPU machine writes under $OUT), else benchmarks/results."""
    env = os.environ.get("OLAVLM_RESULTS_DIR")
    return Path(env) if env else REPO_ROOT / "benchmarks" / "results"


def _as_row(record: Record | Mapping[str, Any]) -> dict[str, Any]:
    row = dataclasses.asdict(record) if isinstance(record, Record) else dict(record)
    missing = [name for name in FIELDNAMES if name not in row]
    if missing:
        raise ValueError(f"record lacks fields {missing}: {row!r}")
    return {name: "" if row[name] is None else row[name] for name in FIELDNAMES}


def _default_path(op: str) -> Path:
    # The op names a file, so it must not be able to point outside the results folder.
    if not op or Path(op).name != op or op in (".", ".."):
        raise ValueError(f"op {op!r} cannot be used as a file name")
    return results_dir() / f"{op}.csv"


def _existing_header(path: Path) -> list[str] | None:
    """The header row of `path`, or None when the file is missing or empty."""
    if not path.exists() or path.stat().st_size == 0:
        return None
    with path.open(newline="", encoding="utf-8") as f:
        return next(csv.reader(f), None)


def _check_header(path: Path) -> None:
    header = _existing_header(path)
    if header is not None and tuple(header) != FIELDNAMES:
        raise ValueError(
            f"{path}: existing CSV header does not match Record's fields; refusing to append.\n"
            f"  file header:   {','.join(header)}\n"
            f"  record fields: {','.join(FIELDNAMES)}\n"
            "Move the old file aside (or migrate it) instead of mixing column layouts."
        )


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def _append_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    is_new = _existing_header(path) is None
    # A file cut short mid-row (killed run) would otherwise glue our first row onto its last.
    needs_newline = not is_new and not _ends_with_newline(path)
    with path.open("a", newline="", encoding="utf-8") as f:
        if needs_newline:
            f.write("\n")
        writer = csv.DictWriter(f, fieldnames=FIELDNAMES, lineterminator="\n")
        if is_new:
            writer.writeheader()
        writer.writerows(rows)


def append_records(
    records: Iterable[Record | Mapping[str, Any]], path: str | os.PathLike | None = None,
    *, cpu_rows: bool = False,
) -> list[Path]:
    """Append records to CSV files and return the files written.

    With `path` None each record goes to results_dir()/<op>.csv. Existing rows are never touched;
    a new (or empty) file gets the header first. Every target's header is checked before any
    row is written, so a mismatch (ValueError) leaves all files as they were.
    CPU rows of a GPU benchmark (a smoke run: interpreter timings) stay out of the checked-in
    history unless OLAVLM_RESULTS_DIR names a folder or ``cpu_rows`` (the loader benchmark,
    which measures the CPU).
    """
    records = list(records)
    keep_cpu = cpu_rows or path is not None or bool(os.environ.get("OLAVLM_RESULTS_DIR"))
    if not keep_cpu:
        rows = [_as_row(r) for r in records]
        skipped = sum(r["gpu_name"] == "cpu" for r in rows)
        if skipped:
            print(f"(CPU smoke run: {skipped} record(s) not appended to {results_dir()}; set "
                  "OLAVLM_RESULTS_DIR to keep them elsewhere)")
            records = [r for r, row in zip(records, rows, strict=True) if row["gpu_name"] != "cpu"]
    by_path: dict[Path, list[dict[str, Any]]] = {}
    for record in records:
        row = _as_row(record)
        target = Path(path) if path is not None else _default_path(str(row["op"]))
        by_path.setdefault(target, []).append(row)
    for target in by_path:
        _check_header(target)
    for target, rows in by_path.items():
        _append_rows(target, rows)
    return list(by_path)


def _parse_cell(name: str, value: str | None) -> Any:
    """Numbers back to int/float, empty numeric cells to None; text columns stay strings."""
    if name in _INT_FIELDS or name in _FLOAT_FIELDS:
        if value is None or value == "":
            return None
        return int(value) if name in _INT_FIELDS else float(value)
    return "" if value is None else value


def _csv_paths(paths_or_dir: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    if isinstance(paths_or_dir, (str, os.PathLike)):
        p = Path(paths_or_dir)
        if p.is_dir():
            return sorted(p.glob("*.csv"))
        return [p] if p.exists() else []
    return [Path(p) for p in paths_or_dir]


def read_records(
    paths_or_dir: str | os.PathLike | Iterable[str | os.PathLike],
) -> list[dict[str, Any]]:
    """Rows of the given CSV files (or of every *.csv in a folder), in file then row order.

    Numeric columns come back as int/float, with empty cells as None. A missing folder or file
    gives an empty list.
    """
    rows: list[dict[str, Any]] = []
    for path in _csv_paths(paths_or_dir):
        # (bytes that are not UTF-8, a cell that is not a number, a row cut short by a killed
        # writer: that row is skipped with a line saying so, not the whole report lost)
        with path.open(newline="", encoding="utf-8", errors="replace") as f:
            reader = csv.DictReader(f)
            for raw in reader:
                try:
                    if None in raw.values() or None in raw:
                        raise ValueError("a row with another number of cells than the header")
                    rows.append({k: _parse_cell(k, v) for k, v in raw.items()})
                except ValueError as err:
                    print(f"(skipped {path.name} line {reader.line_num}: {err})",
                          file=sys.stderr)
    return rows


# --------------------------------------------------------------------------------------------
# Text table
# --------------------------------------------------------------------------------------------

DEFAULT_COLUMNS: tuple[str, ...] = (
    "op", "provider", "mode", "shape", "dtype", "ms", "gbps", "tflops", "peak_mib", "gpu_name",
)


def _format_cell(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        # Enough digits to compare runs, without 17-digit noise.
        if abs(value) >= 100:
            return f"{value:.1f}"
        if abs(value) >= 1:
            return f"{value:.3f}"
        return f"{value:.4g}"
    return str(value)


def format_table(
    records: Iterable[Record | Mapping[str, Any]],
    columns: Sequence[str] = DEFAULT_COLUMNS,
    headers: Mapping[str, str] | None = None,
) -> str:
    """A fixed-width text table of `columns` (field names); `headers` renames column titles.

    Numbers are right-aligned, text left-aligned, missing values shown as '-'.
    """
    headers = headers or {}
    dicts = [dataclasses.asdict(r) if isinstance(r, Record) else r for r in records]
    titles = [headers.get(c, c) for c in columns]
    cells = [[_format_cell(d.get(c)) for c in columns] for d in dicts]
    numeric = [
        any(isinstance(d.get(c), (int, float)) for d in dicts) for c in columns
    ]
    widths = [max([len(t)] + [len(row[i]) for row in cells]) for i, t in enumerate(titles)]

    def line(values: Sequence[str]) -> str:
        cols = zip(values, widths, numeric, strict=True)
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in cols]
        return "  ".join(parts).rstrip()

    out = [line(titles), line(["-" * w for w in widths])]
    out.extend(line(row) for row in cells)
    return "\n".join(out)


# ---- shared entry points of the benchmarks whose measure() may skip a provider ----


def run_case_or_skip(benchmark, measure: Callable, provider: str, case, mode: str, *,
                     device: str, gpu_only: Sequence[str], columns: Sequence[str]) -> None:
    """pytest-benchmark body: skip GPU-only providers off the GPU and providers whose
    ``measure`` returns None (not installed), else time and attach the record."""
    import pytest  # noqa: PLC0415

    if provider in gpu_only and not torch.cuda.is_available():
        pytest.skip(f"{provider} is timed on GPU only")
    warmup, rep = bench_reps()
    result = measure(provider, case, mode, device=device, warmup=warmup, rep=rep)
    if result is None:
        pytest.skip(f"{provider} is not installed")
    finish_pytest_benchmark(benchmark, *result, rep, columns)


def run_cli(argv, *, description: str, providers: Sequence[str], modes: Sequence[str],
            cases: Callable, measure: Callable, device: str, gpu_only: Sequence[str]) -> int:
    """``--preset/--providers/--modes`` CLI: providers interleaved per case and mode (every
    provider sees the same GPU state), records appended, table printed."""
    import argparse  # noqa: PLC0415

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--preset", choices=["tiny", "full"],
                        default="full" if torch.cuda.is_available() else "tiny")
    parser.add_argument("--providers", default=",".join(providers))
    parser.add_argument("--modes", default=",".join(modes))
    args = parser.parse_args(argv)
    chosen = [p for p in args.providers.split(",") if p]
    unknown = sorted(set(chosen) - set(providers))
    if unknown:
        parser.error(f"--providers: unknown {unknown}; choose from {tuple(providers)}")
    if not torch.cuda.is_available():
        chosen = [p for p in chosen if p not in gpu_only]
    warmup, rep = bench_reps()
    records = []
    for case in cases(args.preset):
        for mode in args.modes.split(","):
            for provider in chosen:
                result = measure(provider, case, mode, device=device, warmup=warmup, rep=rep)
                if result is not None:
                    append_records([result[0]])  # now: a stage cut by its limit keeps it
                    records.append(result[0])
    print(format_table(records))
    return 0
