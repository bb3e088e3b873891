# The training loop: build -> (resume) -> steps with accumulation, guards, metrics, checkpoints.
"""``Trainer(cfg).train()`` runs one training job end to end (``olavlm train`` calls it).

A step: ``grad_accum`` micro-batches (targets from the online teachers or the cache), each
``model(...)`` + backward of ``loss / grad_accum``, the next-token loss normalized by
the whole step's supervised tokens (``_step_ntp_tokens``); gradient clipping; then ONE host
read of a small tensor holding the logged scalars and the finiteness flag. A non-finite loss or
gradient norm skips the optimizer step (counted); ``train.nonfinite_limit`` in a row stops the
run with the step and the component that went bad. SIGTERM/SIGINT finish the current step,
write a checkpoint and exit; ``checkpoint.every_steps`` writes periodic ones. A resumed run
continues exactly where the checkpoint was taken (model, optimizer, schedule, data position,
RNG).
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import itertools
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import torch

from olavlm.config import Config, config_to_dict, save_resolved_config
from olavlm.data.bad_data import truncate_rejects_file
from olavlm.data.loader import LoaderStateMismatch, TooManyRejectsError, rank_rejects_path
from olavlm.teachers.online import PendingTargets

from . import build as B
from . import load as L
from .checkpoint import (
    Checkpointer,
    CheckpointError,
    check_resume_path,
    checkpoint_extra,
    latest_checkpoint,
)
from .metrics import MetricsLogger, flops_per_token, peak_flops, plot_losses, summarize_run
from .optim import (
    apply_hyperparameters,
    build_optimizer,
    build_scheduler,
    hyperparameters,
    set_schedule_length,
)
from .parallel import (
    apply_parallelism,
    check_switches,
    enable_tf32,
    init_distributed,
    sdpa_context,
    set_tf32_state,
    wants_fsdp,
)
from .signals import StopSignals
from .stages import apply_stage, trainable_report

__all__ = ["NoDataError", "NonFiniteLossError", "TrainResult", "Trainer"]

logger = logging.getLogger("olavlm.train")

FINISHED = "FINISHED"


class NonFiniteLossError(RuntimeError):
    pass


class NoDataError(RuntimeError):
    """The data gives nothing to train on (no batches, or a rank's batch entirely rejected)."""


class TrainResult:
    def __init__(self, run_dir: Path, steps: int, stopped: str | None, summary: str):
        self.run_dir, self.steps, self.stopped, self.summary = run_dir, steps, stopped, summary


def _barrier(dist_info):
    if dist_info.distributed:
        torch.distributed.barrier()


def _run_dir(cfg: Config, dist_info) -> tuple[Path, bool]:
    """(output_dir/run_name, whether this call made the folder: known on rank 0 only).
    Without a run_name: continue the newest unfinished run of this recipe when
    checkpoint.resume is "auto" (a crashed job restarts where it stopped), else a new
    timestamped folder. Chosen on rank 0 and broadcast."""
    out = Path(cfg.train.output_dir).expanduser()
    name = cfg.train.run_name
    made = False
    try:  # (on every rank: one rank failing alone would leave the others waiting below)
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file there, under a file, read-only, no permission
        raise ValueError(f"train.output_dir: cannot make the folder {str(out)!r}: "
                         f"{exc.strerror or exc}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"train.output_dir: {str(out)!r} is not writable here")
    if dist_info.is_main and name is None:
        previous = _unfinished_runs(out, cfg.recipe)
        if str(cfg.checkpoint.resume or "").strip().lower() == "auto" and previous:
            name = previous[-1].name
        else:
            name, made = _new_folder(out, f"{cfg.recipe}-{_dt.datetime.now():%Y%m%d-%H%M%S}")
    if dist_info.distributed:
        box = [name]
        torch.distributed.broadcast_object_list(box, src=0)
        name = box[0]
    run_dir = out / name
    if dist_info.is_main and not made:
        try:  # exclusively: of two jobs starting into a new folder, one made it
            run_dir.mkdir(parents=True)
            made = True
        except FileExistsError:
            pass
    _barrier(dist_info)
    return run_dir, made


def _unfinished_runs(out: Path, recipe: str) -> list[Path]:
    """The run folders ``out/<recipe>-*`` with checkpoints and no FINISHED marker, oldest first
    by when their checkpoints last changed (a checkpoint written, renamed or pruned): by time,
    not name, so a user-named ``<recipe>-ablation`` or a ``-10`` suffix never passes for the
    newest run."""
    found = []
    for p in out.glob(f"{recipe}-*"):
        ckpts = p / "checkpoints"
        if p.is_dir() and ckpts.is_dir() and not (p / FINISHED).exists():
            found.append((ckpts.stat().st_mtime_ns, p.name, p))
    return [p for _, _, p in sorted(found)]


def _new_folder(out: Path, stem: str) -> tuple[str, bool]:
    """Create ``out/stem`` (or ``stem-2``, ``stem-3``, ... when taken) exclusively: two jobs
    started in the same second never share a timestamped folder."""
    out.mkdir(parents=True, exist_ok=True)
    for k in range(1, 10_000):
        name = stem if k == 1 else f"{stem}-{k}"
        try:
            (out / name).mkdir()
        except FileExistsError:
            continue
        return name, True
    raise FileExistsError(f"{out}: every name {stem}[-k] is taken")


def _warn_changed_config(run_dir: Path, cfg: Config) -> None:
    """A resumed run whose config differs from the one the folder recorded says so, key by key:
    `resume=auto` continues a run whatever the new overrides, and a forgotten override (or a
    new one) changes the run from here on. The optimizer's lr, betas, eps and weight decay
    follow the new config (apply_hyperparameters); a changed model shape fails the load."""
    from olavlm.run_record import config_changes, previous_config

    old = previous_config(run_dir)
    if old is None:
        return
    from olavlm.config import with_added_keys

    # (a key added since the folder's config was written ran at its default)
    changes = [c for c in config_changes(with_added_keys(old), config_to_dict(cfg))
               if not c.startswith("checkpoint.resume:")]
    if changes:
        logger.warning("resuming %s with a config that differs from its last one (kept as "
                       "config.<n>.yaml); from this step on:\n  %s", run_dir,
                       "\n  ".join(changes))


def _changed_model_keys(run_dir: Path, cfg: Config) -> list[str]:
    """The model.* keys this config changes from the one the run folder recorded last."""
    from olavlm.run_record import config_changes, previous_config

    old = previous_config(run_dir)
    if old is None:
        return []
    return [c for c in config_changes(old, config_to_dict(cfg)) if c.startswith("model.")]


def _refuse_to_restart_over(run_dir: Path) -> None:
    """A fresh start (checkpoint.resume none) into a folder that already holds a run's
    checkpoints would append to its metrics and interleave its checkpoints: refuse, before
    anything is written."""
    previous = latest_checkpoint(run_dir)
    if previous is not None:
        raise ValueError(
            f"{run_dir} already holds a run (latest checkpoint {previous.name}) and "
            "checkpoint.resume is none: pass --resume auto to continue it, or choose another "
            "train.run_name (or remove the folder) to start afresh; nothing was changed")


def _explicit_resume(resume) -> bool:
    return str(resume or "").strip().lower() not in ("", "none", "auto")


def _continuation(run_dir: Path, resume) -> Path | None:
    """The run's own latest checkpoint when its timeline began with ``checkpoint.resume=PATH``
    (each checkpoint records that origin): the same command rerun after a stop, a crash or a
    requeue continues it, even once PATH itself has been pruned. None otherwise."""
    if not _explicit_resume(resume):
        return None
    own = latest_checkpoint(run_dir)
    if own is None:
        return None
    origin = checkpoint_extra(own).get("origin")
    return own if origin == _origin_of(resume) else None


def _origin_of(resume) -> str:
    return str(Path(resume).expanduser().resolve())


def _resume_target(run_dir: Path, resume):
    """What ``checkpoint.resume`` resumes from in ``run_dir``: "auto"/"none" as they are; for a
    PATH, the run's own latest checkpoint when the run began from PATH (see _continuation);
    else PATH, when the folder holds no checkpoint or PATH is one of its own (going back to
    an earlier step: a new timeline). A PATH from elsewhere into a folder holding another
    run's checkpoints is refused, before anything is written."""
    if not _explicit_resume(resume):
        return resume
    own = _continuation(run_dir, resume)
    if own is not None:
        logger.info("checkpoint.resume=%s: %s continued it to %s; resuming from there (a new "
                    "train.run_name branches from %s again)", resume, run_dir, own.name, resume)
        return own
    path = check_resume_path(resume)
    latest = latest_checkpoint(run_dir)
    if latest is None or path.resolve().parent == latest.resolve().parent:
        return resume
    raise ValueError(
        f"{run_dir} already holds a run (latest checkpoint {latest.name}) that did not start "
        f"from checkpoint.resume={str(resume)!r}: pass --resume auto to continue that run, or "
        "choose another train.run_name (or remove the folder) to resume from the checkpoint; "
        "nothing was changed")


def how_to_resume(cfg: Config, run_dir: Path) -> str:
    """The command line change that continues ``run_dir`` from its latest checkpoint: the same
    command where it does (resume=auto, or a named run begun from an outside PATH), else the
    overrides that do (a timestamped folder is new at each start; a PATH inside the run's own
    folder would branch from it again)."""
    resume = cfg.checkpoint.resume
    if not _explicit_resume(resume):
        if str(resume or "").strip().lower() == "auto":
            return "rerun the same command"
    elif cfg.train.run_name is not None and Path(resume).expanduser().resolve().parent \
            != (run_dir / "checkpoints").resolve():
        return "rerun the same command"
    return f"rerun with train.run_name={run_dir.name} --resume auto"


LOCK_NAME = ".lock"


def _lock_run_dir(run_dir: Path):
    """Rank 0 holds an exclusive lock on ``run_dir/.lock`` while it builds and trains: a second
    job into the same folder (a requeued job whose first copy still runs, `--resume auto` in
    another terminal) would interleave metrics and race for checkpoints. The OS releases the
    lock when the process dies, so a crash never leaves the folder locked. Returns the open
    file holding it (None where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return None
    try:
        handle = open(run_dir / LOCK_NAME, "a+")  # noqa: SIM115 - held for the run
    except OSError as exc:  # a read-only folder fails later, where it is written, and says so
        logger.warning("cannot lock %s (%s): training without the run-folder lock", run_dir, exc)
        return None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # held by another process
        handle.close()
        raise ValueError(f"{run_dir} is in use by another training process (it holds "
                         f"{run_dir / LOCK_NAME}): wait for it to finish or stop it, or choose "
                         "another train.run_name; nothing was changed") from None
    except OSError as exc:  # no flock on this file system (Lustre without -o flock, FUSE...)
        handle.close()
        logger.warning("cannot lock %s (%s: file locks unsupported here?): training without "
                       "the run-folder lock", run_dir, exc)
        return None
    return handle


def _remove_failed_start(run_dir: Path) -> None:
    """Delete a run folder this start made, unless it holds a checkpoint (it never should)."""
    if latest_checkpoint(run_dir) is None:
        logger.info("removing %s: the run did not start", run_dir)
        shutil.rmtree(run_dir, ignore_errors=True)


def _skipping_empty(trainer, loader):
    """The loader's batches, minus those whose samples were all rejected (each one is handed
    to ``trainer._empty_batch``, which skips or stops). Epoch mode: each batch drawn counts
    against ``trainer.micro_batches_left``, a skipped one too, and none is drawn past the
    epochs' last (a skip must not pull the next epoch's first batch into the last step)."""
    batches = iter(loader)
    while trainer.micro_batches_left is None or trainer.micro_batches_left > 0:
        batch = next(batches, None)
        if batch is None:
            return
        if trainer.micro_batches_left is not None:
            trainer.micro_batches_left -= 1
        if len(batch) == 0:  # every sample of it rejected (counted by the loader)
            stand_in = trainer._empty_batch(batch)
            if stand_in is not None:
                yield stand_in
            continue
        trainer._last_batch = batch  # (the stand-in of a later batch rejected whole)
        yield batch
    # Epoch mode, the epochs' last batch handed out: let the loader close its epoch (it draws
    # nothing more: it counts the samples dropped by batching and logs the epoch's summary),
    # which the generator, left suspended after that batch, never did.
    plan = getattr(loader, "plan", None)
    if trainer.micro_batches_left == 0 and plan is not None and not plan().global_batches:
        next(batches, None)


def _refuse_no_batches(num_samples: int, world_size: int, loader) -> None:
    """The data gives no batch at all (every rank, before any work): fewer samples than ranks
    (a global batch must give every rank one, docs/data.md), or none left after indexing."""
    if num_samples:
        raise ValueError(f"the data has {num_samples} samples, fewer than the {world_size} "
                         "ranks: every epoch would drop them all (a global batch gives every "
                         f"rank a sample); run at most {num_samples} processes, or add data")
    rejected = getattr(loader, "index_reject_counts", lambda: {})()
    why = ", ".join(f"{r}={n}" for r, n in sorted(rejected.items()))
    raise ValueError("the data has no samples" + (f": every entry was rejected while "
                                                   f"indexing [{why}]" if why else ""))


def _new_window() -> dict:
    """Counters of the steps since the last log line (this rank's share)."""
    return {"samples": 0, "tokens": 0, "steps": 0, "sum_sq_len": 0, "supervised": 0}


class Trainer:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        resume_opt = str(cfg.checkpoint.resume or "").strip().lower()
        if resume_opt not in ("", "none", "auto") and not (  # a bad path fails before any work
                cfg.train.run_name is not None and _continuation(
                    Path(cfg.train.output_dir).expanduser() / cfg.train.run_name,
                    cfg.checkpoint.resume)):
            check_resume_path(cfg.checkpoint.resume)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        self.dist = init_distributed(cfg.train.device, cfg.parallel.backend,
                                     single_group=wants_fsdp(cfg.parallel, world))
        d = self.dist
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
        self.run_dir, made = _run_dir(cfg, d)
        self._lock = None
        try:
            # A folder another job holds is never removed below, even one this start made: the
            # other job may have taken the lock between our mkdir and our lock.
            self._lock = _lock_run_dir(self.run_dir) if d.is_main else None
        except BaseException:
            self._restore_tf32()
            raise
        try:
            self._build(cfg, d, resume_opt)
        except BaseException:
            if made:  # a failed start (a bad model path...) leaves no folder behind
                _remove_failed_start(self.run_dir)
            self._unlock()  # (after the removal: no other job can lock a folder going away)
            self._restore_tf32()
            raise

    def _restore_tf32(self) -> None:
        before, self._tf32_before = getattr(self, "_tf32_before", None), None
        if before is not None:
            set_tf32_state(before)

    def _unlock(self) -> None:
        lock, self._lock = getattr(self, "_lock", None), None
        if lock is not None:
            lock.close()  # (closing the file releases its flock)

    def _build(self, cfg: Config, d, resume_opt: str) -> None:
        """Everything after the run directory is chosen: the run record, tokenizer, model,
        data, parallelism, optimizer, resume, metrics."""
        # (a switch this device cannot run: before any work)
        check_switches(cfg, d.device, d.world_size)
        if resume_opt in ("", "none"):
            _refuse_to_restart_over(self.run_dir)
        resume_from = _resume_target(self.run_dir, cfg.checkpoint.resume)
        wanted = str(resume_from or "").strip().lower()
        if wanted in ("", "none") or (wanted == "auto" and latest_checkpoint(self.run_dir) is None):
            # A start with nothing to resume, in a folder an attempt that crashed before its
            # first checkpoint wrote to: this run redoes that attempt's samples, so its
            # rejects would be listed twice (each rank empties its own file; the loader writes
            # the index's rejects again).
            truncate_rejects_file(rank_rejects_path(self.run_dir / B.REJECTS_FILE, d.rank,
                                                    d.world_size), 0)
        barrier = lambda: _barrier(d)  # noqa: E731
        data_root = None
        if not cfg.data.path:
            data_root = B.synthetic_dataset_dir(cfg, is_main=d.is_main, barrier=barrier)
        B.check_inputs(cfg, data_root)  # (not minutes later, after the LLM loaded)
        self.tokenizer = B.build_tokenizer(cfg, data_root)
        if d.is_main:  # the tokenizer the run trained with (pad token included), for inference
            self.tokenizer.save_pretrained(str(self.run_dir / "tokenizer"))
        # parallel.load=rank0: ranks other than 0 build on the meta device and get rank 0's
        # weights after sharding (olavlm/train/load.py), so init_from is read by rank 0 only.
        load = L.load_mode(cfg.parallel, d.world_size)
        on_meta = load == "rank0" and not d.is_main
        model = B.build_model(cfg, self.tokenizer, self.run_dir, is_main=d.is_main,
                              barrier=barrier, device=d.device, meta=on_meta)
        if cfg.checkpoint.init_from and not on_meta:
            kept = B.load_initial_weights(model, cfg.checkpoint.init_from)
            logger.info("initialized from %s (%d tensors kept their fresh init)",
                        cfg.checkpoint.init_from, len(kept))
        apply_stage(model, cfg.train.stage)
        self.trainable = trainable_report(model)
        if not on_meta:
            model.to(d.device)
        # Before the teachers: the meta ranks take rank 0's RNG state here.
        self.loading = L.prepare(model, load, d)
        self.teachers = B.build_teachers_for(cfg, model, d.device) \
            if cfg.train.stage in ("pt", "full") else None
        self.dataset, self.loader = B.build_data(
            cfg, model, self.tokenizer, data_root, rank=d.rank, world_size=d.world_size,
            run_dir=self.run_dir, online=self.teachers)
        if len(self.loader) == 0:  # (epoch mode would "finish" after 0 steps, exit status 0)
            _refuse_no_batches(len(self.dataset), d.world_size, self.loader)
        # parallel.tf32 (process-wide): close(), or a failed start, puts the caller's back.
        self._tf32_before = enable_tf32(cfg.parallel, d.device)
        self.parallel_done = apply_parallelism(model, cfg.parallel, d)
        L.finish(model, self.loading, d.device)
        if d.distributed:  # (a 1-rank FSDP group needs no gathers)
            model.process_group = torch.distributed.group.WORLD
            self.parallel_done["load"] = load
        self.model = model
        accum = cfg.optim.grad_accum
        if accum < 1:
            raise ValueError(f"optim.grad_accum must be >= 1, got {accum}")
        # Epoch mode: every micro-batch of the epochs, accumulation groups running across epoch
        # boundaries (the loop draws them in one stream), ceil(epochs x batches / grad_accum)
        # steps; the last step takes the micro-batches left when they do not fill a group (no
        # sample of the epochs goes untrained; HF's Trainer counts per epoch instead, which
        # agrees at one epoch, the recipes'); a resume recounts from the data left.
        self.micro_batches_left = None if cfg.train.max_steps else \
            len(self.loader) * max(1, cfg.train.epochs)
        self.total_steps = cfg.train.max_steps or max(1, -(-self.micro_batches_left // accum))
        self.optimizer = build_optimizer(model, cfg.optim, d.device)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, self.total_steps)
        self.checkpointer = Checkpointer(self.run_dir, keep_last=cfg.checkpoint.keep_last)
        self.step = 0
        self.nonfinite_total = 0
        self.nonfinite_run = 0
        resume = self.checkpointer.resolve_resume(resume_from)
        self.origin = None  # the outside checkpoint this run's timeline began from
        if resume is not None:
            fresh = hyperparameters(self.optimizer)
            try:
                extra = self.checkpointer.load(resume, self._state())
            except LoaderStateMismatch as exc:  # the data or its order options changed
                raise ValueError(f"cannot resume from {resume}: {exc}. Go back to the run's "
                                 "data options, or start a new run (another train.run_name) "
                                 f"from these weights with checkpoint.init_from={resume}") \
                    from exc
            except CheckpointError as exc:
                changed = _changed_model_keys(self.run_dir, cfg)
                if not changed:
                    raise
                # A shape mismatch after a model override: the checkpoint is fine, the config
                # is not the run's (resume=auto continues a run whatever the overrides).
                raise CheckpointError(
                    f"{exc}. The model config differs from the run's ({'; '.join(changed)}): a "
                    "resume continues the same model. Go back to the run's model options, or "
                    "train the changed model as a new run (another train.run_name; "
                    f"checkpoint.init_from={resume} starts it from these weights when no "
                    "weight changed shape)") from exc
            self.origin = extra.get("origin")
            if resume.resolve().parent != self.checkpointer.dir.resolve():
                self.origin = _origin_of(resume)
            self.step = int(extra["step"])
            if cfg.train.max_steps and self.step > cfg.train.max_steps:
                raise ValueError(
                    f"train.max_steps={cfg.train.max_steps} is below the step this run resumes "
                    f"at ({self.step}, {resume}): nothing would train, yet the run would be "
                    f"marked finished; pass a train.max_steps above {self.step} to go on (or "
                    "another train.run_name to start a new run); nothing was changed")
            self.nonfinite_total = int(extra.get("nonfinite_total", 0))
            self.nonfinite_run = int(extra.get("nonfinite_run", 0))  # "in a row" spans a resume
            if not cfg.train.max_steps:
                self._recount_epoch_steps(accum, extra.get("schedule"))
            apply_hyperparameters(self.optimizer, self.scheduler, fresh)
            logger.info("resumed from %s at step %d", resume, self.step)
            if d.is_main:
                _warn_changed_config(self.run_dir, cfg)
        self.resumed_from = resume
        # After the resume: a resume that fails leaves the run's recorded config as it was.
        if d.is_main:
            save_resolved_config(cfg, self.run_dir)
            # Training again (a finished run extended): not finished until it ends again, so a
            # stop or crash from here on is found by `--resume auto`.
            (self.run_dir / FINISHED).unlink(missing_ok=True)
        lc = cfg.logging
        self.metrics = MetricsLogger(
            self.run_dir, rank=d.rank, total_steps=self.total_steps, jsonl=lc.jsonl,
            tensorboard=lc.tensorboard, wandb=lc.wandb, wandb_project=lc.wandb_project,
            config_dict=config_to_dict(cfg), progress=lc.progress, start_step=self.step)
        if d.is_main:
            self._log_setup()

    # ---- state ------------------------------------------------------------------------------

    def _state(self) -> dict:
        """What a checkpoint holds (and a resume restores); a collective when distributed
        (every rank saves and loads together): the loader's counts summed over the ranks and
        every rank's rejects-file position go in, so that a resume with another number of
        ranks continues the job's counts and cuts back every old file."""
        if self.dist.distributed and hasattr(self.loader, "job_stats"):
            gathered = [None] * self.dist.world_size
            log = self.loader.log
            torch.distributed.all_gather_object(gathered, (log.state_dict(), log.file_state()))
            self.loader.job_stats = self._job_log([stats for stats, _ in gathered]).state_dict()
            self.loader.job_rejects_files = [files for _, files in gathered]
        return {"model": self.model, "optim": self.optimizer, "scheduler": self.scheduler,
                "loader": self.loader, "rng": True,
                "extra": {"step": self.step, "nonfinite_total": self.nonfinite_total,
                          "nonfinite_run": self.nonfinite_run, "recipe": self.cfg.recipe,
                          "origin": getattr(self, "origin", None),
                          "schedule": {"total_steps": self.total_steps,
                                       "geometry": self._geometry()},
                          # the config these weights were trained under (a resumed leg may
                          # change layer_indices etc.): what `olavlm export` rebuilds
                          "config": config_to_dict(self.cfg)}}

    def _geometry(self) -> list:
        """What an epoch run's step count follows: samples per micro-batch, ranks, grad_accum,
        epochs, and max_steps (0 in epoch mode: a leg run under max_steps counted no epoch)."""
        return [self.cfg.data.batch_size, self.dist.world_size, self.cfg.optim.grad_accum,
                max(1, self.cfg.train.epochs), self.cfg.train.max_steps]

    def _recount_epoch_steps(self, accum: int, saved: dict | None = None) -> None:
        """A resumed epoch-based run (train.max_steps=0) ends where the data ends: the steps
        left follow the loader's restored position (in samples) under this run's batch size,
        ranks and grad_accum, which may differ from the checkpoint's. Unchanged geometry keeps
        the checkpoint's total (``saved``): the uninterrupted run's schedule, which counted
        every batch of the epochs, also those later rejected whole; a changed one stretches or
        shortens the schedule (warm-up and cosine over the new total, from the current
        step)."""
        plan = getattr(self.loader, "plan", None)
        if plan is None:  # (a loader without a plan: counted from the steps done)
            self.micro_batches_left = max(0, self.micro_batches_left - self.step * accum)
            return
        epochs = max(1, self.cfg.train.epochs)
        # A run that finished its epochs closed the last one: the loader stands at the start
        # of the next, which is not to be trained.
        done = self.loader.epoch >= epochs and self.loader.position == 0
        left = (0 if done else len(plan().global_batches)) + \
            max(0, epochs - 1 - self.loader.epoch) * len(self.loader)
        self.micro_batches_left = left
        total = self.step + -(-left // accum)
        if saved and saved.get("geometry") == self._geometry():
            total = int(saved["total_steps"])
        if total != self.total_steps:
            logger.info("epoch mode: %d optimizer steps in all after the resume (the data left "
                        "at this batch size and grad_accum), not %d", total, self.total_steps)
            self.total_steps = total
            set_schedule_length(self.scheduler, self.cfg.optim, total)

    def save_checkpoint(self) -> Path | None:
        began = time.perf_counter()
        try:
            path = self.checkpointer.save(self.step, self._state())
        except CheckpointError as exc:  # out of disk: the previous checkpoint is intact
            logger.error("checkpoint at step %d failed: %s", self.step, exc)
            return None
        if self.dist.is_main:  # (the time sizes torchrun's --shutdown-timeout, docs/train.md)
            logger.info("checkpoint written in %.1f s: %s", time.perf_counter() - began, path)
        return path

    def _log_setup(self) -> None:
        rows = "\n".join(f"  {name:24s} trainable {t:>12,d}  frozen {f:>12,d}"
                         for name, t, f in self.trainable)
        logger.info("run directory: %s", self.run_dir)
        logger.info("stage %s, parameters per module:\n%s", self.cfg.train.stage, rows)
        logger.info("parallel: %s", self.parallel_done or "single process, no switches")
        logger.info("%d optimizer steps of %d x %d samples (x %d ranks)", self.total_steps,
                    self.cfg.optim.grad_accum, self.cfg.data.batch_size, self.dist.world_size)
        (self.run_dir / "trainable.json").write_text(json.dumps(
            [{"module": n, "trainable": t, "frozen": f} for n, t, f in self.trainable],
            indent=1))

    # ---- the loop ---------------------------------------------------------------------------

    def _batches(self):
        """The training stream over epochs; in epoch mode it ends after the epochs' last
        micro-batch."""
        while self.micro_batches_left is None or self.micro_batches_left > 0:
            # A pass that starts mid-epoch may have nothing left (a checkpoint taken right after
            # an epoch's last batch, or a dropped last batch): it just closes the epoch. Only an
            # epoch that yields nothing from its start means there is no data.
            fresh = getattr(self.loader, "position", 0) == 0
            got = False
            try:
                for batch in _skipping_empty(self, self.loader):
                    got = True
                    yield batch
            except TooManyRejectsError as exc:
                raise NoDataError(str(exc)) from None
            if not got and fresh:
                summary = getattr(self.loader, "last_summary", None)
                raise NoDataError("the data loader yields no batches (empty dataset, or every "
                                  "sample rejected?)" + (f": {summary}" if summary else ""))

    def _warn_unsupervised(self) -> None:
        """A step whose batches hold no answer token on this rank trains the next-token loss on
        nothing (its ntp is 0): said at the 1st, 10th, 100th... such step, not silently."""
        self.unsupervised_steps = getattr(self, "unsupervised_steps", 0) + 1
        n = self.unsupervised_steps
        if n == 10 ** int(math.log10(n)):
            logger.warning(
                "step %d: no supervised (answer) tokens in this rank's batch, so no next-token "
                "loss (%d such step%s so far): conversations without an assistant turn, empty "
                "answers, or answers cut off by model.max_length=%d?", self.step + 1, n,
                "" if n == 1 else "s", self.cfg.model.max_length)

    def _empty_batch(self, batch):
        """A batch whose samples were all rejected (``data.on_bad_sample=skip``: a missing
        image at batch size 1, a wrong ``data.image_folder``) has nothing to train on: one
        process skips it (returns None). Ranks cannot skip a micro-batch alone (their
        collectives must match): this rank runs its previous batch as a stand-in with nothing
        to learn from (``Batch.as_stand_in``) and the step goes on with the other ranks'
        samples; before any batch of its own (a run's or a resumed run's first), a text-only
        sample made up by the loader (``ResumableLoader.stand_in_batch``) stands in. If even
        that cannot be made, the run stops naming the samples."""
        rejects = list(getattr(batch, "rejects", []))
        reasons = sorted({r.reason for r in rejects})
        what = f"every sample of a batch was rejected ({', '.join(reasons) or 'no samples'})"
        dist = getattr(self, "dist", None)
        if dist is not None and dist.distributed:
            last = getattr(self, "_last_batch", None)
            stand_in, why = None, ""
            if last is not None:
                stand_in = last.as_stand_in()
            else:
                try:  # (made up, not drawn from the data: the loader's position is unchanged)
                    stand_in = self.loader.stand_in_batch()
                except Exception as err:  # noqa: BLE001 - named in the error below
                    why = f"; no stand-in sample either: {type(err).__name__}: {err}"
            if stand_in is not None:
                logger.warning("rank %d: %s: a stand-in with no label, image or target runs in "
                               "its place (the ranks' steps must match)", dist.rank, what)
                return stand_in
            named = "; ".join(r.message() for r in rejects[:3])
            raise NoDataError(
                f"rank {dist.rank}: {what} before this rank had a batch of its own to stand in "
                f"for it, and the ranks cannot skip a step alone ({named}{why}): restore or "
                "replace those files (removing the entries changes the data: the run could not "
                "resume from its checkpoints), or raise data.batch_size")
        logger.warning("%s: skipped", what)
        return None

    def _micro_step(self, batch, group: int, ntp_tokens: torch.Tensor, ntp_rows: int):
        """Forward and backward of one of the step's ``group`` micro-batches (its loss scaled
        by 1 / group). The SDPA backend choice covers the backward too: activation
        checkpointing recomputes attention there, and a recompute through another backend
        saves tensors of other shapes (and other values)."""
        dev = self.dist.device
        targets, target_mask = None, batch.target_mask
        if self.teachers is not None:
            # teachers.side_stream: they run beside the vision tower and the LLM forward (the
            # model reads the targets after its decoder: WaitingTargets); the call that
            # measures their memory runs inline. Their targets are on the training device.
            online = self.teachers
            side = online.side_stream is not None and not online.memory_due
            pending = online.submit(batch) if side else PendingTargets(online(batch), None)
            targets, target_mask = pending.lazy(), batch.image_mask  # (the teachers' mask)
            if batch.stand_in:  # nothing to learn from (Batch.as_stand_in)
                target_mask = torch.zeros_like(target_mask)
        elif batch.targets:
            targets = {k: v.to(dev, non_blocking=True) for k, v in batch.targets.items()}
        # Only what the forward reads: batch.to(dev) also copied the teachers' inputs (raw
        # images, views, maps: the teachers move their own) and the cached targets again.
        inputs = [None if t is None else t.to(dev, non_blocking=True) for t in (
            batch.input_ids, batch.attention_mask, batch.labels, batch.images, batch.image_mask,
            target_mask)]
        with sdpa_context(self.cfg.parallel.sdpa_backend):
            out = self.model(*inputs[:5], targets, inputs[5], ntp_tokens=ntp_tokens,
                             ntp_micro_batches=group, ntp_rows=ntp_rows)
            # Autograd keeps what the backward needs; the step's own references to its device
            # inputs and targets (a teacher's seg map besides its transposed copy) go now.
            inputs = targets = pending = None
            (out.loss * (1.0 / group)).backward()
        return out

    def _tokens(self, batch) -> tuple[int, int, int]:
        """(samples, real tokens after splicing, the sum of the samples' squared spliced
        lengths: attention's cost), from the host copy: no device sync."""
        inserted = self.model.num_inserted_tokens - 1
        lengths = batch.attention_mask.sum(1) + inserted * (batch.image_mask > 0).long()
        return len(batch), int(lengths.sum()), int((lengths * lengths).sum())

    def _step_ntp_tokens(self, micro_batches) -> tuple[torch.Tensor, list[int]]:
        """The step's supervised tokens over all ranks (an int64 device tensor), and this
        rank's count per micro-batch (each micro-batch's forward gets its own: the fused LM
        head sizes its buffers for those rows).

        Every token of the optimizer step weighs the same, however the labels fall across
        micro-batches and ranks: each micro-batch divides its loss sum by (the step's supervised
        tokens over all ranks) / grad_accum (``ntp_tokens`` / ``ntp_micro_batches``), so the
        accumulated ``loss / grad_accum`` is the mean over the step's tokens (a mean of
        micro-batch means would not be). Counted on the host copies
        (``count_supervised_tokens``), summed over ranks on the device: no sync. An integer
        tensor, so that FSDP2's mixed precision does not cast it to bf16 on the way in."""
        counts = [int(self.model.count_supervised_tokens(b.input_ids, b.attention_mask,
                                                          b.labels)) for b in micro_batches]
        # torch.full launches a fill kernel; torch.tensor(int, device=cuda) would copy from the
        # host and synchronize (the host would wait for the previous step's optimizer).
        total = torch.full((), sum(counts), device=self.dist.device, dtype=torch.int64)
        if self.dist.distributed:
            torch.distributed.all_reduce(total)
        return total, counts

    def train(self) -> TrainResult:
        """Train to the configured step (or a stop signal); the run folder's lock is released
        when this returns or raises."""
        try:
            return self._train()
        finally:
            self._unlock()

    def _train(self) -> TrainResult:
        cfg, d = self.cfg, self.dist
        accum = cfg.optim.grad_accum
        batches = self._batches()
        stopped = None
        t_last = time.perf_counter()
        window = _new_window()
        scalars: dict = {}  # the last step's logged values
        with StopSignals() as signals:
            while self.step < self.total_steps:
                self.model.train()
                sums = None
                # grad_accum micro-batches; the last step of an epoch run takes those left
                group = accum if self.micro_batches_left is None else \
                    max(1, min(accum, self.micro_batches_left))
                micro_batches = list(itertools.islice(batches, group))
                if not micro_batches:  # epoch mode: the last batches were all rejected whole
                    logger.info("epoch mode: the data ends after step %d (the epochs' last "
                                "batches were rejected whole), not %d", self.step,
                                self.total_steps)
                    self.total_steps = self.step
                    if window["steps"]:  # the steps since the last log line, as at the end
                        self._log(scalars, window, time.perf_counter() - t_last)
                    break
                group = len(micro_batches)
                ntp_tokens, micro_counts = self._step_ntp_tokens(micro_batches)
                counted = sum(micro_counts)
                scored = torch.zeros((), device=d.device)
                window["supervised"] += counted
                if counted == 0:
                    self._warn_unsupervised()
                for micro, batch in enumerate(micro_batches):
                    n, tok, sq = (0, 0, 0) if getattr(batch, "stand_in", False) else \
                        self._tokens(batch)
                    window["samples"] += n
                    window["tokens"] += tok
                    window["sum_sq_len"] += sq
                    sync = micro == group - 1
                    if hasattr(self.model, "set_requires_gradient_sync"):
                        self.model.set_requires_gradient_sync(sync)
                    out = self._micro_step(batch, group, ntp_tokens, micro_counts[micro])
                    parts = torch.stack([out.loss.detach().float()]
                                        + list(out.components.values()))
                    sums = parts / group if sums is None else sums + parts / group
                    scored = scored + out.num_valid_tokens.float()
                    names = ["loss"] + list(out.components)
                    # (not kept into the next forward: its loss holds the step's autograd graph)
                    del out
                del micro_batches
                grad_norm = self._clip()
                # Flags every rank must agree on: "some rank saw a non-finite value" and "some
                # rank got SIGTERM/SIGINT" (MAX over ranks), so all skip or stop together.
                bad = ~(torch.isfinite(sums).all() & torch.isfinite(grad_norm))
                # (torch.full: a fill kernel; torch.tensor(x, device=cuda) would sync the host)
                flags = torch.stack([bad.float(), torch.full((), float(signals.requested),
                                                             device=bad.device)])
                if d.distributed:
                    torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
                    # Each rank's losses are its share scaled to the global batch (the model's
                    # distributed weighting): their mean over ranks is the global loss to log.
                    torch.distributed.all_reduce(sums)
                    sums = sums / d.world_size
                # The one host read of the step: logged scalars, the tokens the loss scored
                # (checked against the host count the divisor came from), the two flags.
                values = torch.cat([sums, scored.reshape(1), grad_norm.float().reshape(1),
                                    flags]).tolist()
                scalars = dict(zip(names, values[:-4], strict=True))
                if int(values[-4]) != counted:
                    raise RuntimeError(
                        f"step {self.step + 1}: the next-token loss scored {int(values[-4])} "
                        f"tokens but count_supervised_tokens counted {counted}; the loss "
                        "normalization would be wrong (a splice/count mismatch: please report)")
                scalars["grad_norm"] = values[-3]
                stop_requested = values[-1] > 0.5
                self._step_lr = self._step_lrs()
                if values[-2] > 0.5:
                    self._skip_nonfinite(scalars)
                else:
                    self.nonfinite_run = 0
                    self.optimizer.step()
                    self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                window["steps"] += 1
                if self.step % cfg.logging.every_steps == 0 or self.step == self.total_steps:
                    t_now = time.perf_counter()
                    self._log(scalars, window, t_now - t_last)
                    t_last = t_now
                    window = _new_window()
                every = cfg.checkpoint.every_steps
                # One process: act on a signal that came during this step's logging too. A
                # signal during the last step changes nothing: the run ends as finished (the
                # final checkpoint, FINISHED), not as a stop that asks to be rerun.
                if (stop_requested or (not d.distributed and signals.requested)) and \
                        self.step < self.total_steps:
                    stopped = signals.signal_name or "a signal on another rank"
                    logger.warning("%s received: writing a checkpoint at step %d and stopping",
                                   stopped, self.step)
                    self._save_or_raise("the checkpoint on stopping")
                    break
                if every and self.step % every == 0 and self.step < self.total_steps:
                    self.save_checkpoint()
            if stopped is None and self.micro_batches_left == 0:
                next(batches, None)  # (epoch mode: the loader closes its last epoch)
            # Inside the signal handlers' block: a SIGTERM during the last save waits for it.
            if stopped is None and cfg.checkpoint.at_end:
                self._save_or_raise("the final checkpoint")
        if stopped is None and d.is_main:
            (self.run_dir / FINISHED).write_text(f"{self.step}\n")
        return self._finish(stopped)

    def _save_or_raise(self, what: str) -> None:
        """A checkpoint the run cannot end without (at the end, on a stop signal): if it fails
        (out of disk), the run stops with CheckpointError (exit status 1) instead of reporting
        success; it is not marked finished, so `--resume auto` continues it."""
        if self.save_checkpoint() is not None:
            return
        prev = self.checkpointer.latest()
        where = f"the last checkpoint is {prev}" if prev is not None else \
            "there is no checkpoint"
        raise CheckpointError(
            f"{what} at step {self.step} could not be written (the error is above); {where}: "
            f"free disk space and {how_to_resume(self.cfg, self.run_dir)} to continue from it")

    def _clip(self) -> torch.Tensor:
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not params:
            return torch.zeros((), device=self.dist.device)
        clip = self.cfg.optim.grad_clip
        if clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
        else:  # off: the norm alone (clipping at inf rewrote every gradient, times 1)
            norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
            norm = norm.full_tensor()
        return norm

    def _skip_nonfinite(self, scalars: dict) -> None:
        self.nonfinite_total += 1
        self.nonfinite_run += 1
        bad = [k for k, v in scalars.items() if not math.isfinite(v)]
        logger.warning("step %d: non-finite %s; optimizer step skipped (%d in a row, %d total)",
                       self.step + 1, ", ".join(bad), self.nonfinite_run, self.nonfinite_total)
        limit = self.cfg.train.nonfinite_limit
        if limit and self.nonfinite_run >= limit:
            raise NonFiniteLossError(
                f"stopping at step {self.step + 1}: {self.nonfinite_run} non-finite steps in a "
                f"row (last: {', '.join(bad)}); {self._last_checkpoint_text()}; lower "
                "optim.lr or check the data")

    def _last_checkpoint_text(self) -> str:
        latest = self.checkpointer.latest()
        return (f"the last checkpoint is {latest}" if latest is not None else
                "no checkpoint was written yet")

    def _step_lrs(self) -> dict:
        """The learning rates this step updates with (the scheduler steps after it): "lr" is
        optim.lr's under the schedule (the LLM's and, unless they have their own, every
        group's; not the first group's, which may be the heads'), plus "lr/projector" and
        "lr/heads" where optim.projector_lr / optim.head_lr give those groups their own."""
        factor = self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
        out = {"lr": self.cfg.optim.lr * factor}
        by_role: dict = {}
        for group in self.optimizer.param_groups:
            by_role.setdefault(group.get("role"), group["lr"])
        for role, own in (("projector", self.cfg.optim.projector_lr),
                          ("heads", self.cfg.optim.head_lr)):
            if own is not None and role in by_role:
                out[f"lr/{role}"] = by_role[role]
        return out

    def _log(self, scalars: dict, window: dict, seconds: float) -> None:
        d = self.dist
        steps = max(1, window["steps"])
        rate = 1.0 / max(seconds, 1e-9)
        if d.distributed:
            # The job's counts, not rank 0's times the ranks: ranks differ (truncated or
            # rejected samples, an uneven last batch). One small collective per logged step.
            keys = ("samples", "tokens", "sum_sq_len", "supervised")
            counts = torch.tensor([float(window[k]) for k in keys], dtype=torch.float64,
                                  device=d.device)
            torch.distributed.all_reduce(counts)
            window = dict(window, **dict(zip(keys, counts.tolist(), strict=True)))
        logged = dict(scalars)
        logged.update({
            **self._step_lr, "step_time_s": seconds / steps,
            "samples_per_s": window["samples"] * rate,
            "tokens_per_s": window["tokens"] * rate,
            "nonfinite_total": self.nonfinite_total,
        })
        if self.teachers is not None:
            logged.update({k: v for k, v in self.teachers.metrics().items() if v is not None})
        if d.device.type == "cuda":
            logged["peak_mem_gib"] = torch.cuda.max_memory_allocated(d.device) / 2**30
        peak = peak_flops(d.device, self._compute_precision(), tf32=self.cfg.parallel.tf32)
        if peak:
            # This window's own lengths and labels: attention grows with sum(l^2) / sum(l),
            # the LM head runs on the labelled positions only (flops_per_token's docstring).
            tokens = max(1, window["tokens"])
            per_token = flops_per_token(
                self.model.llm.config, seq_len=window["sum_sq_len"] / tokens,
                supervised_fraction=min(1.0, window["supervised"] / tokens),
                weights_trainable=self.cfg.train.stage != "pt")
            logged["mfu"] = logged["tokens_per_s"] * per_token / (peak * d.world_size)
        self.metrics.log(self.step, logged)

    def _compute_precision(self) -> str | torch.dtype:
        """The precision of the LLM's matmuls, whose peak the MFU divides by: FSDP2's param
        dtype where it shards; otherwise the LLM's own dtype (model.dtype=bfloat16 without
        FSDP computes in bf16 while parallel.mixed_precision stays fp32: the TF32 peak would
        double the MFU). float8 runs against the bf16 peak (peak_flops' docstring)."""
        p = self.cfg.parallel
        if p.float8 != "none":
            return "bf16"
        if "fsdp" in self.parallel_done:
            return p.mixed_precision
        return next(self.model.parts.layers.parameters()).dtype

    def _job_log(self, states: list[dict]):
        """Every rank's reject-log counts (``RejectLog.state_dict()``s) summed, the index's
        rejects (counted in each rank's epoch) once."""
        from olavlm.data.bad_data import RejectLog

        log = RejectLog.merged(states, shared=self.loader.index_reject_counts())
        # Samples dropped by batching are the epoch's (global batches), counted alike by every
        # rank (a rank resumed after a change of ranks holds the job's): once, not per rank.
        log.num_dropped = max((int(s.get("num_dropped", 0)) for s in states), default=0)
        return log

    def _job_data_summary(self) -> str | None:
        """The run's data line for summary.txt: the epoch in progress (or the last finished)
        summed over every rank (each rank counts and logs only its own samples), when anything
        was rejected, dropped or trained without targets; None otherwise. A collective when
        distributed: every rank calls it at the end of the run."""
        stats_of = getattr(self.loader, "stats_so_far", None)
        if stats_of is None:
            return None
        mine = stats_of()
        gathered = [mine]
        if self.dist.distributed:
            gathered = [None] * self.dist.world_size
            torch.distributed.all_gather_object(gathered, mine)
        parts = [g for g in gathered if g is not None]
        if not parts:
            return None
        log = self._job_log([state for _, state, _ in parts])
        if not (log.num_rejected or log.num_dropped or log.num_target_problems):
            return None
        epoch, _, running = parts[0]
        ranks = f", {self.dist.world_size} ranks" if self.dist.distributed else ""
        where = " (ids in rejects*.jsonl)" if log.counts or log.target_counts else ""
        return (f"data{ranks}: {log.summary(epoch)}{' (so far)' if running else ''}{where}")

    def _finish(self, stopped: str | None) -> TrainResult:
        self.metrics.close()
        summary = ""
        # The epoch in progress has no summary of its own yet (rejects, samples without
        # targets): without this a one-epoch run never reported them.
        so_far = getattr(self.loader, "epoch_so_far", lambda: None)()
        if so_far is not None:
            logger.log(logging.WARNING if so_far[1] else logging.INFO, "data: %s", so_far[0])
        data_line = self._job_data_summary()
        if self.dist.is_main:
            if self.cfg.logging.plot:
                with contextlib.suppress(Exception):  # a missing matplotlib is not fatal
                    plot_losses(self.run_dir)
            summary = summarize_run(self.run_dir)
            if data_line:
                summary += f"\n{data_line}"
            (self.run_dir / "summary.txt").write_text(summary + "\n")
        return TrainResult(self.run_dir, self.step, stopped, summary)

    def close(self, barrier: bool = True) -> None:
        """Leave the process group (torchrun's, or the 1-rank one of single-process FSDP2).
        ``barrier=False`` after an error only this rank may have hit (NoDataError): the other
        ranks are in a step's collectives and never reach a barrier, which would hold this one
        until the process group's timeout instead of letting it exit (and torchrun stop them)."""
        self._unlock()
        self._restore_tf32()
        metrics = getattr(self, "metrics", None)
        if metrics is not None:  # (closed by train(); a Trainer closed untrained leaked it)
            metrics.close()
        if torch.distributed.is_initialized():
            if barrier:
                torch.distributed.barrier()
            torch.distributed.destroy_process_group()
