# Benchmark report CLI: tables, speedups over the reference, and history plots of results CSVs.
"""Summarise the benchmark history in benchmarks/results (or --results DIR).

    python benchmarks/report.py                  # every row, grouped by op/mode/shape
    python benchmarks/report.py --latest         # newest row per configuration + speedups
    python benchmarks/report.py --op ceiling --plot history.png

Speedups are always computed from the newest row per configuration, within one GPU: a speedup is
ms(baseline) / ms(provider), where the baseline is the first of the providers 'seed' (the
step), 'reference', 'eager' (the LM head, silu_mul, RoPE) and 'torch' that the group has with a
time (an out-of-memory seed step falls back to the reference, as bench_step's own table does).
A pair whose newest rows come from different commits is marked "(other runs)": times moved by
up to 2.8x between machines of one GPU type, so only same-run ratios are measurements.
Providers renamed since their rows were written count under today's name (the step's "fused"
is "fused_cached"), so a newer row supersedes them.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import math
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

try:
    from benchmarks.common import format_table, read_records, results_dir
except ModuleNotFoundError:  # run as a script: only benchmarks/ itself is on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.common import format_table, read_records, results_dir

__all__ = ["latest_rows", "main", "plot_history", "speedups"]

TABLE_COLUMNS = (
    "op", "provider", "mode", "shape", "dtype", "ms", "gbps", "tflops", "peak_mib", "gpu_name",
    "git_sha",
)
TABLE_HEADERS = {"gbps": "GB/s", "tflops": "TFLOP/s", "peak_mib": "peak MiB", "gpu_name": "gpu"}
BASELINES = ("seed", "reference", "eager", "torch")  # the first timed one is the baseline
# (op, old provider name) -> today's name: bench_step's ALIASES (records before its modes).
# Without it the old name is a configuration of its own that no newer row ever supersedes.
RENAMED = {("ola_step", "fused"): "fused_cached"}

# A configuration: rows with the same key measure the same thing, so only the newest counts.
CONFIG_FIELDS = ("op", "provider", "mode", "shape", "dtype", "gpu_name")
# A comparison group: the providers of one op/mode/shape/dtype on one GPU.
GROUP_FIELDS = ("op", "mode", "shape", "dtype", "gpu_name")
SERIES_FIELDS = ("provider", "mode", "shape", "dtype", "gpu_name")
_EPOCH = _dt.datetime.min.replace(tzinfo=_dt.timezone.utc)


def _key(row: dict[str, Any], fields: Sequence[str]) -> tuple[str, ...]:
    return tuple(str(row.get(f) or "") for f in fields)


def _when(row: dict[str, Any]) -> _dt.datetime:
    """The row's timestamp as an aware datetime; unparsable ones sort first."""
    try:
        t = _dt.datetime.fromisoformat(str(row.get("timestamp") or ""))
    except ValueError:
        return _EPOCH
    return t if t.tzinfo else t.replace(tzinfo=_dt.timezone.utc)


def _by_time(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    # sorted() is stable, so rows with equal timestamps keep file order (later row = newer).
    return sorted(rows, key=_when)


def _renamed(row: dict[str, Any]) -> dict[str, Any]:
    name = RENAMED.get((row.get("op"), row.get("provider")))
    return row if name is None else {**row, "provider": name}


def latest_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The newest row of each (op, provider, mode, shape, dtype, gpu_name), providers under
    their current names (``RENAMED``)."""
    newest: dict[tuple[str, ...], dict[str, Any]] = {}
    for row in _by_time([_renamed(r) for r in rows]):
        newest[_key(row, CONFIG_FIELDS)] = row
    return list(newest.values())


def _baseline(group: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    # Timed rows only: an OOM seed row (ms NaN) must not hide the reference's speedups.
    for name in BASELINES:
        for row in group:
            if row.get("provider") == name and _timed(row):
                return row
    return None


def _timed(row: dict[str, Any]) -> bool:
    ms = row.get("ms")
    return isinstance(ms, (int, float)) and math.isfinite(ms) and ms > 0


def speedups(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """ms(baseline) / ms(provider) for every non-baseline provider, over the newest rows."""
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row in latest_rows(rows):
        groups.setdefault(_key(row, GROUP_FIELDS), []).append(row)
    out = []
    for key in sorted(groups):
        base = _baseline(groups[key])
        if base is None:
            continue
        for row in sorted(groups[key], key=lambda r: str(r.get("provider"))):
            if row is base or not _timed(row):  # (an out-of-memory row's ms is NaN)
                continue
            entry = dict(zip(GROUP_FIELDS, key, strict=True))
            same_run = row.get("git_sha") == base.get("git_sha")
            entry.update(
                provider=row["provider"],
                baseline=base["provider"],
                speedup=f"{base['ms'] / row['ms']:.2f}x" + ("" if same_run else " (other runs)"),
            )
            out.append(entry)
    return out


def _filter(rows: Iterable[dict[str, Any]], op: str | None, gpu_only: bool) -> list[dict]:
    kept = []
    for row in rows:
        if op is not None and row.get("op") != op:
            continue
        if gpu_only and row.get("device") != "cuda":
            continue
        kept.append(row)
    return kept


def _table_order(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    # Group a configuration's providers next to each other, oldest first inside a group.
    by_time = _by_time(rows)
    return sorted(by_time, key=lambda r: _key(r, GROUP_FIELDS + ("provider",)))


# --------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------

_METRICS = (("gbps", "GB/s"), ("tflops", "TFLOP/s"), ("ms", "ms"))


def _series_metric(series: Sequence[dict[str, Any]]) -> tuple[str, str]:
    """GB/s if the series has it, else TFLOP/s, else ms."""
    for field, unit in _METRICS:
        if any(r.get(field) is not None for r in series):
            return field, unit
    return "ms", "ms"


def _plot_op(ax, op: str, rows: Sequence[dict[str, Any]]) -> None:
    ordered = _by_time(rows)
    series: dict[tuple[str, ...], list[tuple[int, dict[str, Any]]]] = {}
    for x, row in enumerate(ordered):
        series.setdefault(_key(row, SERIES_FIELDS), []).append((x, row))
    units = set()
    for key, points in sorted(series.items()):
        field, unit = _series_metric([r for _, r in points])
        units.add(unit)
        xs = [x for x, r in points if r.get(field) is not None]
        ys = [r[field] for _, r in points if r.get(field) is not None]
        provider, mode, shape, dtype, gpu = key
        label = f"{provider} {mode} {shape} {dtype} [{gpu}] ({unit})"
        ax.plot(xs, ys, marker="o", markersize=3, label=label)
    # Label at most ~40 ticks so long histories stay readable.
    step = max(1, len(ordered) // 40)
    ticks = list(range(0, len(ordered), step))
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(ordered[i].get("git_sha") or "?") for i in ticks],
                       rotation=90, fontsize=6)
    ax.set_title(op)
    ax.set_xlabel("record (by time), git sha")
    ax.set_ylabel(" / ".join(sorted(units)))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=6, loc="best")


def plot_history(rows: Sequence[dict[str, Any]], png: str | Path) -> Path:
    """Write a PNG with one subplot per op: the metric of each series over the record history."""
    import matplotlib

    matplotlib.use("Agg")  # headless: CI and GPU machines have no display
    import matplotlib.pyplot as plt

    by_op: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_op.setdefault(str(row.get("op")), []).append(row)
    ops = sorted(by_op)
    fig, axes = plt.subplots(len(ops), 1, figsize=(11, 4 * len(ops)), squeeze=False)
    for ax, op in zip(axes[:, 0], ops, strict=True):
        _plot_op(ax, op, by_op[op])
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=None,
                   help="folder of results CSVs (default: OLAVLM_RESULTS_DIR or "
                        "benchmarks/results)")
    p.add_argument("--op", default=None, help="only this op")
    p.add_argument("--latest", action="store_true",
                   help="only the newest row per op/provider/mode/shape/dtype/gpu")
    p.add_argument("--plot", type=Path, default=None, metavar="PNG",
                   help="also write the history plot to this PNG")
    p.add_argument("--gpu-only", action="store_true", help="drop rows measured on CPU")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    folder = args.results if args.results is not None else results_dir()
    rows = _filter(read_records(folder), args.op, args.gpu_only)
    if not rows:
        filtered = " matching --op/--gpu-only" if (args.op or args.gpu_only) else ""
        print(f"no benchmark records{filtered} in {folder}")
        return 0
    shown = latest_rows(rows) if args.latest else rows
    print(format_table(_table_order(shown), TABLE_COLUMNS, TABLE_HEADERS))
    ups = speedups(rows)
    if ups:
        print("\nspeedup over baseline (newest rows; ms_baseline / ms):")
        print(format_table(ups, GROUP_FIELDS + ("provider", "baseline", "speedup"),
                           {"gpu_name": "gpu"}))
    if args.plot is not None:
        print(f"\nplot written to {plot_history(rows, args.plot)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
