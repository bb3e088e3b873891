# Training metrics: throughput, FLOPs/MFU, the JSONL log, progress bar, TensorBoard/W&B, plots.
"""What the trainer reports every logging step, and the run's after-the-fact summary.

- :class:`StepTimer`: wall time, samples/s and tokens/s over a logging window. Counts are host
  integers (or device tensors summed lazily); the device is synchronized only in ``read()``,
  i.e. once per logging step, never inside the step.
- :func:`flops_per_token` / :func:`peak_flops` / :func:`mfu` (flops.py, re-exported): model
  FLOPs utilization, reported only on devices whose peak is known (H100, H200, A100, MI300X).
- :class:`MetricsLogger`: rank 0 appends one JSON object per logged step to
  ``run_dir/metrics.jsonl`` (flushed per line), draws a progress bar with ETA, and forwards to
  TensorBoard / Weights & Biases when they are installed and enabled (never required).
- :func:`read_metrics`, :func:`plot_losses`, :func:`summarize_run`: read the log back (a
  resumed run's re-logged steps replace the crashed run's), draw the loss curves, summarize.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

# FLOPs and MFU live in flops.py; re-exported here (the trainer and benchmarks import them).
from .flops import flops_per_token, llm_matmul_params, mfu, peak_flops, peak_flops_for_name

__all__ = [
    "MetricsLogger",
    "StepTimer",
    "flops_per_token",
    "llm_matmul_params",
    "loss_keys",
    "memory_stats",
    "mfu",
    "peak_flops",
    "peak_flops_for_name",
    "plot_losses",
    "read_metrics",
    "summarize_run",
]

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "losses.png"
TASKS = ("gen", "depth", "seg")


# ---- throughput -------------------------------------------------------------------------------


def _synchronize(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device is not None and device.type not in ("cpu", "meta"):
        accel = getattr(torch, device.type, None)
        if accel is not None and hasattr(accel, "synchronize"):
            accel.synchronize()


class StepTimer:
    """Throughput over the steps since the last ``read()``.

    ``add(samples=, tokens=)`` per micro-batch (ints from the host batch, or a device tensor of
    counted tokens: summed on the device, read once in ``read()``); ``step()`` per optimizer
    step; ``read()`` at logging steps only: it synchronizes the device once (so the window's
    device work is included in its wall time), returns ``step_time_s`` (mean per step),
    ``samples_per_s`` and ``tokens_per_s`` (this rank's x ``world_size``, i.e. the job's,
    assuming balanced ranks) and starts the next window.
    """

    def __init__(self, device: torch.device | str | None = None, *, world_size: int = 1) -> None:
        self.device = torch.device(device) if device is not None else None
        self.world_size = int(world_size)
        self._reset(time.perf_counter())

    def _reset(self, now: float) -> None:
        self._start = now
        self.num_steps = 0
        self.num_samples = 0
        self._tokens: int | torch.Tensor = 0

    def add(self, *, samples: int, tokens: int | torch.Tensor) -> None:
        self.num_samples += int(samples)
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.detach().sum()
        self._tokens = self._tokens + tokens

    def step(self) -> None:
        self.num_steps += 1

    def read(self) -> dict[str, float]:
        _synchronize(self.device)
        now = time.perf_counter()
        seconds = max(now - self._start, 1e-9)
        tokens = self._tokens
        tokens = int(tokens.item()) if isinstance(tokens, torch.Tensor) else int(tokens)
        out = {
            "step_time_s": seconds / max(1, self.num_steps),
            "samples_per_s": self.num_samples * self.world_size / seconds,
            "tokens_per_s": tokens * self.world_size / seconds,
        }
        self._reset(now)
        return out


def memory_stats(device: torch.device | str) -> dict[str, float]:
    """Peak memory so far, in GiB: ``peak_mem_gib`` (allocated by torch on a CUDA/ROCm device;
    a host-side counter, no sync) or, on CPU, ``peak_rss_gib`` (the process's peak RSS)."""
    device = torch.device(device)
    if device.type == "cuda":
        return {"peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30}
    try:
        import resource
    except ImportError:  # not on POSIX
        return {}
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    scale = 1 if sys.platform != "darwin" else 1 / 1024  # bytes on macOS
    return {"peak_rss_gib": kib * scale / 2**20}


# ---- progress ---------------------------------------------------------------------------------


def _hms(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _short(scalars: Mapping[str, float | None]) -> str:
    parts = []
    for key, fmt in (("loss", ".4f"), ("ntp", ".4f"), ("lr", ".2e"), ("tokens_per_s", ".0f"),
                     ("mfu", ".1%")):
        v = scalars.get(key)
        if v is not None:
            parts.append(f"{'tok/s' if key == 'tokens_per_s' else key} {v:{fmt}}")
    return "  ".join(parts)


class _Progress:
    """A tqdm bar on a terminal; plain lines (every ~2% of the run, first and last step) when
    stderr is a file or tqdm is not installed, so logs stay readable. ETA from the mean step
    time since the first logged step (which includes warm-up/compilation)."""

    def __init__(self, total: int) -> None:
        self.total = max(1, int(total))
        self.every = max(1, self.total // 50)
        self.bar = None
        self.first: tuple[int, float] | None = None
        self.use_tqdm = False
        if sys.stderr.isatty():
            try:
                import tqdm  # noqa: F401
                self.use_tqdm = True
            except ImportError:
                pass

    def update(self, step: int, scalars: Mapping[str, float | None]) -> None:
        now = time.monotonic()
        if self.first is None:
            self.first = (step, now)
            if self.use_tqdm:
                from tqdm import tqdm
                self.bar = tqdm(total=self.total, initial=max(0, step - 1), unit="step",
                                dynamic_ncols=True, file=sys.stderr)
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix_str(_short(scalars), refresh=False)
            return
        if step % self.every and step not in (self.first[0], self.total):
            return
        s0, t0 = self.first
        eta = "?"
        if step > s0:
            eta = _hms((now - t0) / (step - s0) * (self.total - step))
        print(f"step {step}/{self.total} ({step / self.total:.0%})  {_short(scalars)}  "
              f"elapsed {_hms(now - t0)}  ETA {eta}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# ---- the logger -------------------------------------------------------------------------------


def _to_floats(scalars: Mapping[str, Any]) -> dict[str, float | int | None]:
    """Host numbers; tensors are read in one transfer per device. Non-finite -> None (JSON has
    no NaN; ``null`` reads back everywhere)."""
    out: dict[str, Any] = {}
    tensors: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for key, value in scalars.items():
        if isinstance(value, torch.Tensor):
            tensors.setdefault(value.device, []).append((str(key), value))
        else:
            out[str(key)] = value
    for device, items in tensors.items():
        # float64: an int64 count or a float64 value survives (float32 rounds them above 2**24);
        # MPS has no float64.
        dtype = torch.float32 if device.type == "mps" else torch.float64
        values = torch.stack([t.detach().to(dtype).reshape(()) for _, t in items]).tolist()
        out.update(zip([k for k, _ in items], values, strict=True))
    for key, value in out.items():
        if value is None or isinstance(value, bool | int):
            continue
        value = float(value)
        out[key] = value if math.isfinite(value) else None
    return out


class MetricsLogger:
    """Per-step metrics of rank 0: ``run_dir/metrics.jsonl``, a progress bar, TensorBoard, W&B.

    Every rank may construct it and call ``log``; ranks other than ``rank`` 0 do nothing.
    ``log(step, scalars)`` writes ``{"step": step, "time": unix_time, **scalars}`` as one line
    (flushed) and returns the host values; tensor values are read in one transfer. TensorBoard
    (``run_dir/tensorboard``) and W&B are used only when enabled and installed (a missing one
    warns once and is skipped). W&B runs offline unless ``WANDB_API_KEY``/``WANDB_MODE`` say
    otherwise; its run id is kept in ``run_dir/wandb_id.txt`` so a resumed run continues it.
    ``start_step``: the step a resumed run continues from; TensorBoard hides the events the
    crashed run logged after it (``purge_step``), as ``read_metrics`` drops them.
    """

    def __init__(self, run_dir: str | os.PathLike, *, rank: int = 0, total_steps: int,
                 jsonl: bool = True, tensorboard: bool = False, wandb: bool = False,
                 wandb_project: str = "olavlm", config_dict: dict | None = None,
                 progress: bool = True, start_step: int = 0) -> None:
        self.run_dir = Path(run_dir)
        self.rank = int(rank)
        self.total_steps = int(total_steps)
        self.active = self.rank == 0
        self._file = None
        self._tb = None
        self._wandb = None
        self._progress = _Progress(total_steps) if (self.active and progress) else None
        if not self.active:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if jsonl:
            path = self.run_dir / METRICS_FILE
            self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
            # A crash mid-line leaves a partial last line: start ours on a fresh one.
            if path.stat().st_size:
                with open(path, "rb") as f:
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":
                        self._file.write("\n")
        if tensorboard:
            # Without purge_step a resumed run's re-run steps are drawn twice (zig-zag lines).
            self._tb = _open_tensorboard(self.run_dir / "tensorboard", config_dict,
                                         purge_step=int(start_step) + 1 if start_step else None)
        if wandb:
            self._wandb = _open_wandb(self.run_dir, wandb_project, config_dict)

    def log(self, step: int, scalars: Mapping[str, Any]) -> dict[str, Any]:
        if not self.active:
            return {}
        values = _to_floats(scalars)
        if self._file is not None:
            record = {"step": int(step), "time": round(time.time(), 3), **values}
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        if self._progress is not None:
            self._progress.update(int(step), values)
        if self._tb is not None:
            for key, value in values.items():
                if value is not None:
                    self._tb.add_scalar(key, value, int(step))
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in values.items() if v is not None}, step=int(step))
        return values

    def close(self) -> None:
        """Flush and close everything; safe to call twice."""
        if self._progress is not None:
            self._progress.close()
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _open_tensorboard(logdir: Path, config_dict: dict | None, purge_step: int | None = None):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        warnings.warn("logging.tensorboard is on but the tensorboard package is not installed "
                      "(pip install tensorboard); not writing TensorBoard events", stacklevel=3)
        return None
    writer = SummaryWriter(log_dir=str(logdir), purge_step=purge_step)
    if config_dict:
        writer.add_text("config", "```\n" + json.dumps(config_dict, indent=1, default=str)
                        + "\n```")
    return writer


def _open_wandb(run_dir: Path, project: str, config_dict: dict | None):
    try:
        import wandb
    except ImportError:
        warnings.warn("logging.wandb is on but wandb is not installed (pip install wandb); "
                      "not logging to Weights & Biases", stacklevel=3)
        return None
    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY")
                                            else "offline")
    id_file = run_dir / "wandb_id.txt"
    run_id = id_file.read_text().strip() if id_file.exists() else os.urandom(4).hex()
    id_file.write_text(run_id + "\n")
    # W&B ignores steps at or below the last one it saw: after a resume, the re-run steps
    # between the checkpoint and the crash appear once (the first time), metrics.jsonl has both.
    return wandb.init(project=project, dir=str(run_dir), name=run_dir.name, id=run_id,
                      resume="allow", mode=mode, config=config_dict or {})


# ---- reading, plotting, summarizing -----------------------------------------------------------


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The records of ``run_dir/metrics.jsonl`` (or of that file), one per step, sorted.

    A resumed run appends to the file; when a record's step is not after the previous
    record's, the run restarted there, so the earlier records from that step on (logged by the
    crashed run after its checkpoint) are dropped. Unparsable lines (a crash mid-write) are
    skipped."""
    path = Path(run_dir)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.exists():
        return []
    by_step: dict[int, dict] = {}
    last = None
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
                step = int(record["step"])
            except (ValueError, KeyError, TypeError):
                continue
            if last is not None and step <= last:
                by_step = {s: r for s, r in by_step.items() if s < step}
            by_step[step] = record
            last = step
    return [by_step[s] for s in sorted(by_step)]


def loss_keys(records: list[dict]) -> list[str]:
    """The loss components present: "loss", "ntp", the weighted task losses, then the
    per-layer "<task>/L<k>/smooth_l1" and "<task>/L<k>/contrastive" terms."""
    keys: dict[str, None] = {}
    for r in records:
        keys.update(dict.fromkeys(r))
    per_layer = sorted(k for k in keys if k.count("/") == 2 and
                       k.rsplit("/", 1)[1] in ("smooth_l1", "contrastive"))
    tasks = {k.split("/", 1)[0] for k in per_layer} | set(TASKS)
    head = [k for k in ("loss", "ntp") if k in keys]
    return head + sorted(k for k in keys if k in tasks) + per_layer


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records
           if isinstance(r.get(key), int | float) and math.isfinite(r[key])]
    return [p[0] for p in pts], [float(p[1]) for p in pts]


def _moving_average(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_losses(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path | None:
    """Draw the loss curves of ``run_dir/metrics.jsonl`` into a PNG (default
    ``run_dir/losses.png``) and return its path: total and next-token loss; the weighted task
    losses; the per-layer smooth-L1/contrastive terms. Raw values faint, a moving average
    (window ~2% of the steps) on top; log-y when a panel's values are positive and span more
    than a factor of 10. Without matplotlib: one line on stderr and None."""
    try:
        from matplotlib.figure import Figure  # the OO API: no pyplot state, no GUI backend
    except ImportError:
        print("plot_losses: matplotlib is not installed; no loss plot "
              "(pip install matplotlib)", file=sys.stderr)
        return None
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    keys = loss_keys(records)
    panels = [("total and next-token loss", [k for k in keys if k in ("loss", "ntp")]),
              ("weighted task losses", [k for k in keys if "/" not in k and
                                        k not in ("loss", "ntp")]),
              ("per-layer embedding losses", [k for k in keys if "/" in k])]
    # Only keys with a finite value (a diverged run logs null): an empty panel has no legend.
    panels = [(title, [k for k in ks if _series(records, k)[1]]) for title, ks in panels]
    panels = [(title, ks) for title, ks in panels if ks]
    if not panels:
        raise ValueError(f"{run_dir / METRICS_FILE} has no loss values to plot")
    fig = Figure(figsize=(7, 3.2 * len(panels)), layout="constrained")
    window = max(1, len(records) // 50)
    for i, (title, ks) in enumerate(panels):
        ax = fig.add_subplot(len(panels), 1, i + 1)
        every = []
        groups = list(dict.fromkeys(k.rsplit("/", 1)[0] for k in ks))
        for k in ks:
            steps, values = _series(records, k)
            if not values:
                continue
            every += values
            # Per-layer terms: one colour per (task, layer), dashed for the contrastive term.
            color = f"C{groups.index(k.rsplit('/', 1)[0]) % 10}"
            style = "--" if k.endswith("/contrastive") else "-"
            ax.plot(steps, values, color=color, linestyle=style, alpha=0.25, linewidth=0.8)
            ax.plot(steps, _moving_average(values, window), color=color, linestyle=style,
                    linewidth=1.4, label=k)
        if every and min(every) > 0 and max(every) > 10 * min(every):
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2 if len(ks) > 6 else 1)
    out = Path(out) if out is not None else run_dir / PLOT_FILE
    fig.savefig(out, dpi=110)
    return out


def summarize_run(run_dir: str | os.PathLike) -> str:
    """A short report: steps and wall time, each loss component's first vs last value (means
    of the first and last 10% of the logged steps) with the relative change, and where the
    run directory, the loss plot and the last checkpoint are."""
    from .checkpoint import latest_checkpoint

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    lines = [f"run directory: {run_dir}"]
    if not records:
        return "\n".join(lines + ["no metrics logged"])
    steps = [r["step"] for r in records]
    times = [r["time"] for r in records if isinstance(r.get("time"), int | float)]
    wall = _hms(max(times) - min(times)) if len(times) > 1 else "?"
    lines.append(f"steps {steps[0]}..{steps[-1]} ({len(steps)} logged), wall time {wall} "
                 "(first to last logged step)")
    n = max(1, len(records) // 10)
    width = max((len(k) for k in loss_keys(records)), default=4)
    for key in loss_keys(records):
        _, values = _series(records, key)
        if not values:
            continue
        first = sum(values[:n]) / len(values[:n])
        last = sum(values[-n:]) / len(values[-n:])
        change = ""
        if first != 0 and len(values) > 1:  # (one value: no change to report)
            rel = (last - first) / abs(first)
            change = f"  ({'down' if rel < 0 else 'up'} {abs(rel):.1%})"
        lines.append(f"  {key:<{width}}  {first:.4g} -> {last:.4g}{change}")
    plot = run_dir / PLOT_FILE
    lines.append(f"loss plot: {plot if plot.exists() else 'none'}")
    ckpt = latest_checkpoint(run_dir)
    lines.append(f"last checkpoint: {ckpt if ckpt is not None else 'none'}")
    return "\n".join(lines)
