# Atomic training checkpoints (torch.distributed.checkpoint) and resume.
"""Save and resume a training run exactly.

A checkpoint is a directory ``run_dir/checkpoints/step_000100/`` holding:

- ``.metadata`` + ``__<rank>_0.distcp``: the model and optimizer through
  ``torch.distributed.checkpoint`` (DCP). ``get_state_dict``/``set_state_dict`` make this work
  for plain modules and for FSDP2-sharded ones (each rank writes its shards; a different world
  size can load them). Without a process group DCP runs in single-process mode (measured on
  torch 2.14: save/load restore model and AdamW state bit-identically), so there is no
  separate non-distributed format.
- ``rank_00000.pt`` (one per rank): scheduler, data-loader state, RNG states, ``extra``; plain
  containers and tensors only, read back with ``torch.load(weights_only=True)``.
- ``COMPLETE``: JSON written last by rank 0 (step, time, world size, the file list with sizes).

Atomicity: everything is written into ``checkpoints/.tmp-step_000100-<random>/``; only when
every rank has written its files does rank 0 write ``COMPLETE`` and ``os.replace`` the directory
to its final name. A crash at any point leaves either the previous checkpoints plus a ``.tmp-*``
directory (ignored, deleted by the next successful save) or the new complete checkpoint.
``latest()`` scans for directories whose ``COMPLETE`` marker parses and whose listed files exist
with their recorded sizes; no symlinks. Disk errors (ENOSPC...) while writing delete the
temporary directory and raise :class:`CheckpointError` naming the previous checkpoint, which is
untouched (old checkpoints are pruned only after a new one is complete).

Typical use (the trainer's)::

    ckpt = Checkpointer(run_dir, keep_last=3)
    state = {"model": model, "optim": optimizer, "scheduler": scheduler, "loader": loader,
             "rng": True, "extra": {"step": step}}
    path = ckpt.resolve_resume("auto")              # latest valid one, or None
    if path is not None:
        extra = ckpt.load(path, state)               # restores everything in place
    ...
    with StopSignals() as stop:  # olavlm.train.signals
        ...  # step
        if stop.requested:
            ckpt.save(step, state); break
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import secrets
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from .signals import StopSignals  # re-exported: its home until olavlm.train.signals

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "StopSignals",
    "check_resume_path",
    "checkpoint_problem",
    "latest_checkpoint",
    "list_checkpoints",
    "read_model_weights",
    "rng_state",
    "set_rng_state",
]

logger = logging.getLogger(__name__)

MARKER = "COMPLETE"
FORMAT_VERSION = 1
STATE_KEYS = ("model", "optim", "scheduler", "loader", "rng", "extra")
_NAME_RE = re.compile(r"^step_(\d+)$")
_TMP_PREFIX = ".tmp-"
# Checkpoints of a timeline a resumed run branched off (resumed from an earlier step) are moved
# to this prefix + their name, kept (never pruned) but no longer seen by resume=auto.
SUPERSEDED_PREFIX = "superseded-"
_DCP_WARNING = "torch.distributed is disabled, unavailable or uninitialized"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (disk full, I/O error) or is not a valid checkpoint.
    When raised by ``save``, the previous checkpoints are intact and the message names the
    newest one."""


# ---- RNG --------------------------------------------------------------------------------------


def rng_state() -> dict:
    """This process's RNG states: Python ``random``, numpy's global generator, torch CPU, and
    every CUDA device's when CUDA is initialized (not initializing it on CPU runs). Plain
    containers and tensors only, so ``torch.load(weights_only=True)`` reads it back."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state`'s output: the next random draws equal those after the save."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            warnings.warn(f"the checkpoint holds CUDA RNG states for {len(cuda)} devices, this "
                          f"process sees {torch.cuda.device_count()}: CUDA RNG not restored",
                          stacklevel=2)


# ---- scanning ---------------------------------------------------------------------------------


def _step_of(path: Path) -> int | None:
    m = _NAME_RE.match(path.name)
    return int(m.group(1)) if m else None


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """None when ``path`` is a complete checkpoint, else what is wrong with it (one line)."""
    path = Path(path)
    if not path.is_dir():
        return "no such directory" if not path.exists() else "not a directory"
    marker = path / MARKER
    if not marker.is_file():
        return (f"the {MARKER} marker is missing (an interrupted write, or not a checkpoint "
                "directory)")
    try:
        info = json.loads(marker.read_text())
        files = info["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"the {MARKER} marker is unreadable ({exc})"
    missing, wrong = [], []
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            missing.append(name)
        elif f.stat().st_size != size:
            wrong.append(f"{name} ({f.stat().st_size} bytes, expected {size})")
    if missing:
        return f"files listed in {MARKER} are missing: {', '.join(sorted(missing))}"
    if wrong:
        return f"files have the wrong size: {', '.join(wrong)}"
    return None


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The complete checkpoints under ``run_dir/checkpoints``, oldest step first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(s, p) for p in root.iterdir() if (s := _step_of(p)) is not None]
    return [p for _, p in sorted(found) if checkpoint_problem(p) is None]


def no_checkpoint_reason(run_dir: str | os.PathLike) -> str:
    """Why ``run_dir`` has no complete checkpoint, for an error message: no checkpoints folder,
    an empty one, or each ``step_N`` and what it lacks (the newest three)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return f"{run_dir} holds no complete checkpoint (no checkpoints/ folder)"
    found = sorted((s, p) for p in root.iterdir() if (s := _step_of(p)) is not None)
    if not found:
        return f"{run_dir} holds no complete checkpoint ({root} holds no step_N folder)"
    why = "; ".join(f"{p.name}: {checkpoint_problem(p)}" for _, p in found[-3:])
    return f"{run_dir} holds no complete checkpoint ({why})"


def checkpoint_extra(path: str | os.PathLike) -> dict:
    """The ``extra`` dict a checkpoint's marker recorded ({} when none: an older checkpoint,
    or an unreadable marker)."""
    try:
        extra = json.loads((Path(path) / MARKER).read_text()).get("extra")
    except (OSError, ValueError, AttributeError):
        return {}
    return extra if isinstance(extra, dict) else {}


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of ``run_dir``, or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


# ---- writers (module functions so tests can make them fail) -----------------------------------


def _write_dcp(path: Path, state_dict: dict, *, process_group) -> None:
    import torch.distributed.checkpoint as dcp

    no_dist = not (dist.is_available() and dist.is_initialized())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_DCP_WARNING)
        dcp.save(state_dict, checkpoint_id=str(path), process_group=process_group,
                 no_dist=no_dist)


def _read_dcp(path: Path, state_dict: dict, *, process_group) -> None:
    import torch.distributed.checkpoint as dcp

    no_dist = not (dist.is_available() and dist.is_initialized())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_DCP_WARNING)
        dcp.load(state_dict, checkpoint_id=str(path), process_group=process_group,
                 no_dist=no_dist)


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_rank_file(path: Path, payload: dict) -> None:
    import io

    buf = io.BytesIO()
    torch.save(payload, buf)
    _fsync_write(path, buf.getvalue())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _failure(exc: BaseException) -> tuple[str, str]:
    """(kind, text): kind "os" for I/O errors (also inside DCP's CheckpointException)."""
    inner = [exc]
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict):
        inner = [pair[0] if isinstance(pair, tuple) else pair for pair in failures.values()]
    # A full disk rarely surfaces as the OSError itself: torch.save's writer reports
    # "RuntimeError: ... unexpected pos" with the ENOSPC OSError as its __context__.
    causes = [_os_error_in_chain(e) for e in inner]
    kind = "os" if all(c is not None for c in causes) else "other"
    text = "; ".join(f"{type(e).__name__}: {e}" + (f" (caused by {type(c).__name__}: {c})"
                                                   if c is not None and c is not e else "")
                     for e, c in zip(inner, causes, strict=True))
    return kind, text


def _os_error_in_chain(exc: BaseException) -> OSError | None:
    """The first OSError among exc and its __cause__ / __context__ links."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        # An explicit cause, else the implicit context unless "raise ... from None" hid it.
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return None


# ---- the checkpointer -------------------------------------------------------------------------


def check_resume_path(resume: str | os.PathLike) -> Path:
    """``checkpoint.resume=PATH``: the path, which must be a complete checkpoint directory
    (CheckpointError naming the path and what is missing otherwise; a run directory gets the
    overrides that continue it)."""
    path = Path(resume).expanduser()
    problem = checkpoint_problem(path)
    if problem is not None:
        hint = ""
        if path.is_dir() and (path / "checkpoints").is_dir():
            run = path.resolve()
            latest = latest_checkpoint(path)
            hint = (f"; this is a run directory: to continue it in place pass "
                    f"train.output_dir={run.parent} train.run_name={run.name} --resume auto"
                    + (f", or resume from one of its checkpoints ({latest})" if latest else ""))
        raise CheckpointError(f"checkpoint.resume={str(resume)!r} is not a valid "
                              f"checkpoint: {path}: {problem}{hint}")
    return path


class Checkpointer:
    """Writes and reads ``run_dir/checkpoints/step_<N>/`` (see the module docstring).

    ``keep_last``: complete checkpoints kept after a save (0 or less: all). ``process_group``:
    the group DCP and the rank agreement use (None: the default group when one is initialized,
    else single-process). All ranks call ``save``/``load`` together; ``run_dir`` must be on a
    filesystem every rank sees.
    """

    def __init__(self, run_dir: str | os.PathLike, *, keep_last: int = 3,
                 process_group=None) -> None:
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / "checkpoints"
        self.keep_last = int(keep_last)
        self.process_group = process_group
        # Checkpoint names this object wrote or loaded: this run's timeline. A complete
        # checkpoint of the same step that is not among them belongs to a timeline this run
        # branched off (resumed from an earlier step) and is superseded, not kept as "ours".
        self._mine: set[str] = set()

    # -- process group helpers
    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    @property
    def rank(self) -> int:
        return dist.get_rank(self.process_group) if self.distributed else 0

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.process_group) if self.distributed else 1

    def _broadcast(self, obj: Any) -> Any:
        if not self.distributed:
            return obj
        box = [obj]
        src = 0 if self.process_group is None else dist.get_global_rank(self.process_group, 0)
        dist.broadcast_object_list(box, src=src, group=self.process_group)
        return box[0]

    def _gather(self, obj: Any) -> list:
        if not self.distributed:
            return [obj]
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.process_group)
        return out

    def _barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self.process_group)

    # -- queries
    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        return list_checkpoints(self.run_dir)

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        return latest_checkpoint(self.run_dir)

    def resolve_resume(self, resume: str | os.PathLike | None) -> Path | None:
        """``CheckpointConfig.resume``: "auto" = the latest complete checkpoint (None when there
        is none), "none" (or None / "") = None, anything else = that checkpoint directory, which
        must be complete (CheckpointError naming the path and what is missing otherwise)."""
        if resume is None or str(resume).strip().lower() in ("", "none"):
            return None
        if str(resume).strip().lower() == "auto":
            return self.latest()
        return check_resume_path(resume)

    def _previous_text(self) -> str:
        prev = self.latest()
        if prev is None:
            return f"there is no previous checkpoint in {self.dir}"
        return f"the previous checkpoint {prev.name} ({prev}) is intact"

    # -- save
    def save(self, step: int, state: dict) -> Path:
        """Write ``state`` as checkpoint ``step`` and return its directory (all ranks call it).

        ``state`` keys (all optional): "model" (nn.Module, plain or FSDP2), "optim" (its
        optimizer; needs "model"), "scheduler" and "loader" (objects with
        ``state_dict``/``load_state_dict``), "rng" (True: this process's RNG states; or an
        :func:`rng_state` dict taken earlier), "extra" (a JSON-able dict, returned by ``load``).
        A complete checkpoint for ``step`` that this object wrote or loaded is returned as is;
        one from a timeline this run branched off (it resumed from an earlier step), and every
        later-step one, is moved aside as ``superseded-step_N`` (kept, never pruned, no longer
        picked by resume=auto) with a warning. Raises
        CheckpointError on disk errors (the temporary files are removed, previous checkpoints
        untouched); programming errors (an unpicklable state...) propagate after the cleanup.
        """
        _check_state(state)
        name = f"step_{int(step):06d}"
        final = self.dir / name
        plan: tuple[str, str] | None = None
        if self.rank == 0:
            plan = self._prepare(name, final)
        kind, tmp_name = self._broadcast(plan)
        if kind == "exists":
            logger.info("checkpoint %s (this run's) already exists; not rewritten", final)
            return final
        if kind == "error":
            raise CheckpointError(f"cannot create a checkpoint directory in {self.dir} "
                                  f"({tmp_name}); {self._previous_text()}")
        tmp = self.dir / tmp_name
        own: tuple[str, str] | None = None
        own_exc: BaseException | None = None
        try:
            if "model" in state:
                to_save = state if _optim_in_dcp(state) else {"model": state["model"]}
                _write_dcp(tmp, _model_optim_state(to_save), process_group=self.process_group)
            tmp.mkdir(parents=True, exist_ok=True)
            _write_rank_file(tmp / f"rank_{self.rank:05d}.pt", _rank_payload(state))
        except (Exception, CheckpointException) as exc:  # DCP's is a BaseException
            own, own_exc = _failure(exc), exc
        failures = [(r, f) for r, f in enumerate(self._gather(own)) if f is not None]
        moved: list[str] = []
        if not failures and self.rank == 0:
            try:
                # The abandoned timeline's later checkpoints go aside before the rename: a
                # crash right after it must not leave them for resume=auto to pick over this.
                newer = [p for p in self.checkpoints() if (_step_of(p) or 0) > int(step)]
                moved = [self._supersede(p) for p in newer]
                self._publish(tmp, final, step, state.get("extra"))
            except OSError as exc:
                own, own_exc = _failure(exc), exc
                failures = [(0, own)]
        if moved:
            warnings.warn(f"{self.dir} held checkpoints of later steps from the run this one "
                          f"branched off (it resumed from an earlier step); resume=auto would "
                          f"have picked them over the new {name}: moved aside as "
                          f"{', '.join(moved)} (delete them when not needed)", stacklevel=2)
        failures = self._broadcast(failures)
        if failures:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            self._barrier()
            text = "; ".join(f"rank {r}: {t}" for r, (_, t) in failures)
            if any(k != "os" for _, (k, _) in failures):
                if own_exc is not None and own is not None and own[0] != "os":
                    raise own_exc
                raise RuntimeError(f"checkpoint {name} failed on another rank: {text}")
            raise CheckpointError(
                f"could not write checkpoint {name} in {self.dir} ({text}); removed the partial "
                f"files; {self._previous_text()}") from own_exc
        self._mine.add(name)
        if self.rank == 0:
            self._prune(keep=final)
        self._barrier()
        return final

    def _supersede(self, path: Path) -> str:
        """Rank 0: rename a checkpoint of an abandoned timeline out of resume=auto's sight."""
        aside = self.dir / f"{SUPERSEDED_PREFIX}{path.name}-{secrets.token_hex(3)}"
        os.replace(path, aside)
        return aside.name

    def _prepare(self, name: str, final: Path) -> tuple[str, str]:
        """Rank 0: ("exists", "") | ("write", tmp name) | ("error", reason)."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            if final.exists():
                if checkpoint_problem(final) is None:
                    if name in self._mine:
                        return ("exists", "")
                    aside = self._supersede(final)
                    warnings.warn(f"{final} came from the run this one branched off (it resumed "
                                  f"from an earlier step): moved aside as {aside} and written "
                                  "anew (delete the old one when not needed)", stacklevel=3)
                    tmp_name = f"{_TMP_PREFIX}{name}-{secrets.token_hex(4)}"
                    (self.dir / tmp_name).mkdir()
                    return ("write", tmp_name)
                # Not ours to trust (a partial copy?): moved aside, pruned like a crash leftover.
                aside = self.dir / f"{_TMP_PREFIX}{name}-invalid-{secrets.token_hex(4)}"
                warnings.warn(f"{final} is not a complete checkpoint "
                              f"({checkpoint_problem(final)}); moved to {aside.name}",
                              stacklevel=3)
                os.replace(final, aside)
            tmp_name = f"{_TMP_PREFIX}{name}-{secrets.token_hex(4)}"
            (self.dir / tmp_name).mkdir()
            return ("write", tmp_name)
        except OSError as exc:
            return ("error", f"{type(exc).__name__}: {exc}")

    def _publish(self, tmp: Path, final: Path, step: int, extra: dict | None = None) -> None:
        """Rank 0, after every rank wrote: the marker, then the atomic rename. The marker
        repeats ``extra`` (rank 0's), readable without loading the checkpoint."""
        files = {str(p.relative_to(tmp)): p.stat().st_size
                 for p in sorted(tmp.rglob("*")) if p.is_file()}
        info = {"format": FORMAT_VERSION, "step": int(step), "time": time.time(),
                "world_size": self.world_size, "torch": torch.__version__, "files": files}
        if extra is not None:
            info["extra"] = extra
        _fsync_write(tmp / MARKER, json.dumps(info, indent=1).encode())
        _fsync_dir(tmp)
        os.replace(tmp, final)
        _fsync_dir(self.dir)

    def _prune(self, keep: Path) -> None:
        """Rank 0: delete crash leftovers (.tmp-*) and complete checkpoints beyond keep_last."""
        for p in self.dir.glob(f"{_TMP_PREFIX}*"):
            logger.info("removing the leftover of an interrupted checkpoint: %s", p)
            shutil.rmtree(p, ignore_errors=True)
        if self.keep_last <= 0:
            return
        complete = [p for p in self.checkpoints() if p != keep]
        for p in complete[:max(0, len(complete) - (self.keep_last - 1))]:
            shutil.rmtree(p, ignore_errors=True)

    # -- load
    def load(self, path: str | os.PathLike | None, state: dict) -> dict:
        """Restore ``state``'s objects in place from ``path`` (None: the latest) and return the
        checkpoint's ``extra`` dict. Same keys as ``save``; "rng" truthy restores this
        process's RNG states. Raises CheckpointError when the checkpoint is invalid or lacks a
        component ``state`` asks for."""
        _check_state(state, loading=True)
        path = self.latest() if path is None else Path(path)
        if path is None:
            raise CheckpointError(f"no complete checkpoint in {self.dir}")
        problem = checkpoint_problem(path)
        if problem is not None:
            raise CheckpointError(f"{path} is not a valid checkpoint: {problem}")
        info = json.loads((path / MARKER).read_text())
        payload = self._read_rank_file(
            path, info, per_rank_state=bool(state.get("rng")) or state.get("loader") is not None)
        if path.parent.resolve() == self.dir.resolve():
            self._mine.add(path.name)  # this run continues from it
        if "model" in state:
            self._load_model_optim(path, state, payload)
        for key in ("scheduler", "loader"):
            if key in state and state[key] is not None:
                if key not in payload:
                    raise CheckpointError(f"{path} holds no {key!r} state (saved without it)")
                state[key].load_state_dict(payload[key])
        if state.get("rng"):
            if "rng" not in payload:
                raise CheckpointError(f"{path} holds no RNG state (saved without 'rng')")
            set_rng_state(payload["rng"])
        return json.loads(payload.get("extra", "{}"))

    def _load_model_optim(self, path: Path, state: dict, payload: dict) -> None:
        if not (path / ".metadata").is_file():
            raise CheckpointError(f"{path} holds no model state (no .metadata); it was saved "
                                  "without 'model'")
        optim = state.get("optim")
        groups_only = optim is not None and "optim_param_groups" in payload
        with_optim = {"model": state["model"], "optim": None if groups_only else optim}
        sd = _model_optim_state(with_optim)
        if "optim" in sd:
            saved = _saved_keys(path)
            if not any(k.startswith("optim.") for k in saved):
                raise CheckpointError(f"{path} holds no optimizer state (saved without 'optim')")
            _check_same_trainable(path, saved, sd["optim"]["state"], len(optim.param_groups))
            # A fresh optimizer's template holds state for every parameter (DCP initializes it
            # with a zero-lr step); the checkpoint only for those that had gradients. Those
            # without stay without, as in the uninterrupted run (AdamW's bias correction
            # starts at their first gradient).
            opt_state = sd["optim"]["state"]
            for fqn in list(opt_state):
                if not any(f"optim.state.{fqn}.{name}" in saved for name in opt_state[fqn]):
                    del opt_state[fqn]
        try:
            _read_dcp(path, sd, process_group=self.process_group)
        except CheckpointException as exc:
            raise CheckpointError(f"could not load the model/optimizer from {path}: "
                                  f"{_failure(exc)[1]}") from None
        _set_model_optim_state(with_optim, sd)
        if groups_only:  # saved before the optimizer's first step: no state, only its groups
            groups = payload["optim_param_groups"]
            if len(groups) != len(optim.param_groups) or any(
                    len(a["params"]) != len(b["params"])
                    for a, b in zip(groups, optim.param_groups, strict=False)):
                raise CheckpointError(_trainable_changed(path, "its optimizer groups differ"))
            optim.load_state_dict({"state": {}, "param_groups": groups})

    def _read_rank_file(self, path: Path, info: dict, per_rank_state: bool = True) -> dict:
        """This rank's file (rank 0's when the checkpoint had fewer ranks). ``per_rank_state``:
        the caller restores RNG or loader state, which a changed world size cannot continue
        exactly (warned); loading the model alone (an export) needs no warning."""
        saved_world = int(info.get("world_size", 1))
        rank = self.rank
        if saved_world != self.world_size and per_rank_state:
            warnings.warn(f"{path} was written by {saved_world} ranks, this run has "
                          f"{self.world_size}: model/optimizer are resharded, but RNG and "
                          "per-rank loader states come from rank "
                          f"{rank if rank < saved_world else 0}'s file, so the continuation "
                          "is not bit-exact", stacklevel=3)
        if rank >= saved_world:
            rank = 0
        f = path / f"rank_{rank:05d}.pt"
        try:
            return torch.load(f, map_location="cpu", weights_only=True)
        except Exception as exc:  # unpickling errors have several types across torch versions
            raise CheckpointError(f"cannot read {f}: {type(exc).__name__}: "
                                  f"{_load_error_detail(exc)}; {_earlier_checkpoint(path)}") \
                from exc


def _load_error_detail(exc: BaseException) -> str:
    """torch.load's reason without its advice: for a damaged file the weights-only unpickler's
    message suggests ``weights_only=False``, which cannot help and would run arbitrary code."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation")[0]
        return "the file is damaged or not a checkpoint file (" + " ".join(text.split()) + ")"
    return text.strip().splitlines()[0] if text.strip() else "no detail"


def _earlier_checkpoint(path: Path) -> str:
    """What to do about an unreadable checkpoint: the complete one before it, if any."""
    step = _step_of(path)
    earlier = [p for p in list_checkpoints(path.parent.parent)
               if step is not None and (_step_of(p) or 0) < step]
    if earlier:
        return (f"the checkpoint before it is complete: resume from it with "
                f"--resume {earlier[-1]} (or move {path.name} aside)")
    return "no earlier checkpoint of this run is left"


def _check_state(state: dict, *, loading: bool = False) -> None:
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    unknown = sorted(set(state) - set(STATE_KEYS))
    if unknown:
        raise ValueError(f"state has unknown keys {unknown}; valid keys: {list(STATE_KEYS)}")
    if "optim" in state and "model" not in state:
        raise ValueError("state['optim'] needs state['model'] (the optimizer's parameters are "
                         "named after the model's)")
    if "model" in state and not isinstance(state["model"], torch.nn.Module):
        raise TypeError(f"state['model'] must be an nn.Module, got "
                        f"{type(state['model']).__name__}")
    for key in ("scheduler", "loader"):
        obj = state.get(key)
        if obj is not None and not (hasattr(obj, "state_dict") and
                                    hasattr(obj, "load_state_dict")):
            raise TypeError(f"state[{key!r}] must have state_dict/load_state_dict, got "
                            f"{type(obj).__name__}")
    if not loading and "extra" in state:
        try:
            json.dumps(state["extra"])
        except (TypeError, ValueError) as exc:
            raise TypeError(f"state['extra'] must be JSON-serializable: {exc}") from None


def _trainable_changed(path: Path, what: str) -> str:
    return (f"cannot resume from {path}: {what}, so the trainable parameters changed since it "
            "was saved (train.stage, or what the stage trains). To train from these weights "
            f"with other trainable parameters, start a new run with checkpoint.init_from={path}")


def _check_same_trainable(path: Path, saved: set[str], template: dict, num_groups: int) -> None:
    """The checkpoint's optimizer must cover the parameters this run trains, in as many groups:
    DCP loads param groups non-strictly, and a mismatch only surfaced as a KeyError inside the
    optimizer's first step. Parameters trained now but without saved state are fine (they had
    no gradient yet); saved state for a parameter not trained now is not."""
    prefix = "optim.state."
    had_state = {k[len(prefix):].rsplit(".", 1)[0] for k in saved if k.startswith(prefix)}
    extra = sorted(had_state - set(template))
    if extra:
        raise CheckpointError(_trainable_changed(
            path, f"it holds optimizer state for {len(extra)} parameters this run does not "
                  f"train (e.g. {extra[0]})"))
    groups = {k.split(".")[2] for k in saved if k.startswith("optim.param_groups.")}
    if groups and len(groups) != num_groups:
        raise CheckpointError(_trainable_changed(
            path, f"it has {len(groups)} optimizer groups, this run {num_groups}"))


def read_model_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model's full (unsharded) weights in the training checkpoint ``path``, as CPU tensors
    keyed like ``model.state_dict()``: for ``checkpoint.init_from`` (a new stage from a run's
    checkpoint). Read in this process alone (no collective), whatever the world size that
    wrote it, so rank 0 can read it before the model is sharded. CheckpointError when the
    checkpoint is incomplete or holds no model."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = Path(path)
    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(f"{path} is not a valid checkpoint: {problem}")
    if not (path / ".metadata").is_file():
        raise CheckpointError(f"{path} holds no model state (no .metadata)")
    meta = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    weights = {key[len("model."):]: torch.empty(tuple(m.size), dtype=m.properties.dtype)
               for key, m in meta.items()
               if key.startswith("model.") and isinstance(m, TensorStorageMetadata)}
    if not weights:
        raise CheckpointError(f"{path} holds no model weights")
    box = {"model": weights}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_DCP_WARNING)
            dcp.load(box, checkpoint_id=str(path), no_dist=True)
    except CheckpointException as exc:
        raise CheckpointError(f"could not read the model from {path}: "
                              f"{_failure(exc)[1]}") from None
    return box["model"]


def _saved_keys(path: Path) -> set[str]:
    from torch.distributed.checkpoint import FileSystemReader

    return set(FileSystemReader(str(path)).read_metadata().state_dict_metadata)


def _optim_in_dcp(state: dict) -> bool:
    """The optimizer goes through DCP once it has state. Before its first step it has none and
    get_state_dict would create some with a zero-lr step, changing the run: then only its
    param_groups are saved (in the rank file)."""
    return state.get("optim") is not None and bool(state["optim"].state)


def _model_optim_state(state: dict) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if state.get("optim") is not None:
        msd, osd = get_state_dict(state["model"], state["optim"])
        return {"model": msd, "optim": osd}
    return {"model": get_model_state_dict(state["model"])}


def _set_model_optim_state(state: dict, sd: dict) -> None:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    set_model_state_dict(state["model"], sd["model"])  # strict: every key must be there
    if state.get("optim") is not None:
        # Not strict: parameters that never had a gradient have no optimizer state (see
        # Checkpointer._load_model_optim); they get none, as in the uninterrupted run.
        set_optimizer_state_dict(state["model"], state["optim"], sd["optim"],
                                 options=StateDictOptions(strict=False))


def _rank_payload(state: dict) -> dict:
    payload: dict = {}
    if state.get("optim") is not None and not _optim_in_dcp(state):
        payload["optim_param_groups"] = state["optim"].state_dict()["param_groups"]
    for key in ("scheduler", "loader"):
        if state.get(key) is not None:
            payload[key] = state[key].state_dict()
    rng = state.get("rng")
    if rng:
        payload["rng"] = rng if isinstance(rng, dict) else rng_state()
    if "extra" in state:
        payload["extra"] = json.dumps(state["extra"])
    return payload
