# The launcher's edges: the logged lr, a failed last save, the run-folder lock, resume's spelling,
# data workers under a stop signal.
from __future__ import annotations

import errno
import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
from trainhelpers import demo_overrides

import olavlm.train.checkpoint as ckpt_mod
import olavlm.train.trainer as trainer_mod
from olavlm.config import resolve_config
from olavlm.train.cli import main as train_main
from olavlm.train.metrics import read_metrics
from olavlm.train.trainer import FINISHED, Trainer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("synthetic")




def test_the_logged_lr_is_the_one_each_step_used(tmp_path, synth_dir):
    cfg = resolve_config("demo", None, demo_overrides(
        tmp_path, synth_dir, "train.max_steps=4", "checkpoint.every_steps=0",
        "checkpoint.at_end=false", "optim.warmup_ratio=0.5"))
    trainer = Trainer(cfg)
    used = []
    trainer.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: used.append(opt.param_groups[0]["lr"]))
    try:
        trainer.train()
    finally:
        trainer.close()
    logged = [row["lr"] for row in read_metrics(trainer.run_dir)]
    assert len(used) == 4 and logged == pytest.approx(used), (logged, used)
    assert used[-1] > 0  # the last step still updated (the schedule reaches 0 after it)


def test_a_failed_final_checkpoint_fails_the_run(tmp_path, synth_dir, monkeypatch, capsys):
    """Out of disk while writing the last checkpoint: exit status 1 and a message naming the
    checkpoint that is left, no FINISHED marker (so resume=auto continues the run)."""
    real = ckpt_mod._write_rank_file

    def no_space_at_step_4(path, payload):
        if "step_000004" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, payload)

    monkeypatch.setattr(ckpt_mod, "_write_rank_file", no_space_at_step_4)
    rc = train_main(demo_overrides(tmp_path, synth_dir, "train.max_steps=4",
                               "checkpoint.every_steps=2", "train.run_name=job"))
    err = capsys.readouterr().err
    run = tmp_path / "runs" / "job"
    assert rc == 1, err
    assert "final checkpoint at step 4 could not be written" in err and "step_000002" in err
    assert not (run / FINISHED).exists()
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_000002"]


def test_another_jobs_lock_never_removes_the_folder(tmp_path, synth_dir, monkeypatch):
    """This start made the folder, but another job locked it first (the window between mkdir
    and flock): refused, and the folder -- now the other job's -- stays."""
    def locked_by_another_job(run_dir):
        raise ValueError(f"{run_dir} is in use by another training process")

    monkeypatch.setattr(trainer_mod, "_lock_run_dir", locked_by_another_job)
    cfg = resolve_config("demo", None, demo_overrides(tmp_path, synth_dir, "train.run_name=fresh"))
    with pytest.raises(ValueError, match="in use by another training process"):
        Trainer(cfg)
    assert (tmp_path / "runs" / "fresh").is_dir()


@pytest.mark.parametrize("spelling", ["auto", "AUTO", " Auto "])
def test_resume_auto_continues_the_newest_unfinished_run_however_spelled(tmp_path, spelling):
    out = tmp_path / "runs"
    for name in ("demo-20250101-000000", "demo-20250102-000000"):
        (out / name / "checkpoints").mkdir(parents=True)
    (out / "demo-20250102-000000" / FINISHED).write_text("3\n")
    cfg = resolve_config("demo", None, [f"train.output_dir={out}",
                                        f"checkpoint.resume={spelling}"])
    run_dir, made = trainer_mod._run_dir(cfg, SimpleNamespace(is_main=True, distributed=False))
    assert run_dir == out / "demo-20250101-000000" and not made


def test_data_workers_ignore_stop_signals():
    """A scheduler's SIGTERM (and Ctrl-C's SIGINT) reaches the whole process group: data
    workers must outlive it, so that the trainer finishes its step and writes the checkpoint
    (a killed worker would end the run first)."""
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(REPO)!r})
        from olavlm.data.loader import _ignore_stop_signals
        _ignore_stop_signals(0)
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        print("alive")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "alive", proc.stderr
    assert signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN  # (not this process)


def _train_counting_samples(trainer):
    """(the train() result, the size of every micro-batch trained), then close the trainer."""
    seen = []
    tokens = trainer._tokens
    trainer._tokens = lambda batch: (seen.append(len(batch)), tokens(batch))[1]
    try:
        return trainer.train(), seen
    finally:
        trainer.close()


@pytest.mark.parametrize("new_batch", [8, 2])
def test_an_epoch_run_resumed_at_another_batch_size_ends_with_the_epoch(
        tmp_path, synth_dir, new_batch):
    """train.max_steps=0 (one epoch, as the real recipes): preempted after 8 of 16 samples
    at batch 4, resumed at another batch size, the run trains on exactly the 8 samples left
    (the position is in samples; the steps left are recounted from it)."""
    base = demo_overrides(tmp_path, synth_dir, "train.run_name=job", "train.max_steps=0",
                      "train.epochs=1", "checkpoint.every_steps=0")
    first = Trainer(resolve_config("demo", None, [*base, "data.batch_size=4"]))
    log = first._log

    def log_then_preempt(*args):
        log(*args)
        if first.step == 2:
            signal.raise_signal(signal.SIGTERM)  # the scheduler preempts the job

    first._log = log_then_preempt
    try:
        assert first.train().stopped == "SIGTERM"
    finally:
        first.close()
    assert (first.loader.epoch, first.loader.position) == (0, 8)
    second = Trainer(resolve_config("demo", None, [*base, f"data.batch_size={new_batch}"]))
    result, seen = _train_counting_samples(second)
    assert second.total_steps == 2 + 8 // new_batch and result.steps == second.total_steps
    # (the last epoch closed at the end: its samples dropped by batching are counted)
    assert sum(seen) == 8 and (second.loader.epoch, second.loader.position) == (1, 0)


def test_a_start_killed_while_writing_the_tiny_models_resumes(tmp_path, synth_dir):
    """SIGKILL while the first start wrote models/tiny-llama (config.json there, 0 bytes, no
    weights): the rerun of the same command rebuilds it instead of failing on every rerun."""
    run = tmp_path / "runs" / "job"
    half = run / "models" / "tiny-llama"
    half.mkdir(parents=True)
    (half / "config.json").write_text("")
    tower = run / "models" / "tiny-clip"  # the tower had its model but not its processor
    tower.mkdir()
    (tower / "config.json").write_text("{}")
    rc = train_main(demo_overrides(tmp_path, synth_dir, "train.max_steps=1", "train.run_name=job",
                               "checkpoint.every_steps=0"))
    assert rc == 0
    assert (run / FINISHED).exists()
    assert (half / "config.json").stat().st_size > 0 and any(half.glob("*.safetensors"))
    assert (tower / "preprocessor_config.json").is_file()
    assert not list((run / "models").glob(".tmp-*"))


def test_generated_folders_appear_whole_or_not_at_all(tmp_path):
    from olavlm.train.build import generate_folder

    final = tmp_path / "tiny-x"

    def complete(folder):
        return (folder / "weights").is_file()

    def dies_half_way(tmp):
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        generate_folder(final, dies_half_way, is_complete=complete)
    assert not final.exists() and list(tmp_path.iterdir()) == []

    # What a SIGKILL leaves (no `finally`): a .tmp- folder of a process that is gone, removed
    # by the next call; one of a live process (another job writing) is left alone.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    import socket
    host = socket.gethostname()
    stale = tmp_path / f".tmp-tiny-x-{host}-{dead}"
    live = tmp_path / f".tmp-tiny-x-{host}-1"
    stale.mkdir()
    live.mkdir()

    def writes(tmp):
        (tmp / "weights").write_text("w")

    generate_folder(final, writes, is_complete=complete)
    assert (final / "weights").read_text() == "w"
    assert not stale.exists() and live.exists()

    # An incomplete folder from an older version is replaced; a complete one another job
    # finished first is kept.
    live.rmdir()
    (final / "weights").unlink()
    (final / "junk").write_text("j")
    generate_folder(final, writes, is_complete=complete)
    assert sorted(p.name for p in final.iterdir()) == ["weights"]

    def other_job_finishes_first(tmp):
        (tmp / "weights").write_text("mine")
        (final / "weights").write_text("theirs")

    (final / "weights").unlink()
    generate_folder(final, other_job_finishes_first, is_complete=complete)
    assert (final / "weights").read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-x"]


def test_resuming_on_changed_data_says_what_changed_and_how_to_go_on(tmp_path, capsys):
    from olavlm.data.synthetic import write_synthetic_dataset

    data = tmp_path / "d"
    write_synthetic_dataset(data, 16, size=32)
    lines = (data / "train.jsonl").read_text().splitlines(keepends=True)
    (data / "fewer.jsonl").write_text("".join(lines[:12]))
    base = [f"train.output_dir={tmp_path / 'runs'}", f"data.tokenizer={data / 'tokenizer'}",
            f"data.image_folder={data}", "logging.progress=false", "logging.plot=false",
            "train.run_name=job"]
    assert train_main([*base, f"data.path={data / 'train.jsonl'}", "train.max_steps=1"]) == 0
    capsys.readouterr()
    assert train_main([*base, f"data.path={data / 'fewer.jsonl'}", "train.max_steps=2"]) == 2
    err = capsys.readouterr().err
    assert "the data changed: 16 samples when the state was saved, 12 now" in err, err
    assert "checkpoint.init_from=" in err and "step_000001" in err


def test_resuming_with_max_steps_below_the_checkpoint_is_refused(tmp_path, synth_dir, capsys):
    """train.max_steps=1 on a run checkpointed at step 2 trained nothing, yet wrote FINISHED
    and exited 0: refused now, the run left as it was."""
    args = demo_overrides(tmp_path, synth_dir, "train.run_name=job", "checkpoint.every_steps=2")
    assert train_main([*args, "train.max_steps=3", "checkpoint.at_end=false"]) == 0
    run = tmp_path / "runs" / "job"
    (run / FINISHED).unlink()  # as if stopped after the step-2 checkpoint
    metrics = (run / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    assert train_main([*args, "train.max_steps=1"]) == 2
    err = capsys.readouterr().err
    assert "train.max_steps=1 is below the step this run resumes at (2" in err, err
    assert not (run / FINISHED).exists()
    assert (run / "metrics.jsonl").read_bytes() == metrics


def test_a_model_override_on_resume_names_the_changed_keys(tmp_path, synth_dir, capsys):
    """resume=auto continues a run whatever the overrides: a model option that changes a
    weight's shape must say the config changed (not send the user from checkpoint to
    checkpoint as if they were damaged)."""
    args = demo_overrides(tmp_path, synth_dir, "train.run_name=job", "train.max_steps=1")
    assert train_main(args) == 0
    capsys.readouterr()
    assert train_main([*args, "model.num_task_tokens=1", "train.max_steps=2"]) != 0
    err = capsys.readouterr().err
    assert "model.num_task_tokens: 4 -> 1" in err and "a resume continues the same model" in err
    assert "checkpoint before it" not in err  # nothing is damaged


def test_an_epoch_run_trains_the_micro_batches_that_do_not_fill_a_last_group(
        tmp_path, synth_dir):
    """16 samples at batch 4 under grad_accum=3: steps of 3 and 1 micro-batches (the last
    group short, as Hugging Face's Trainer does), every sample trained once, and the short
    step weighted as a step of its own (lr 0: its logged loss is that micro-batch's loss,
    as a grad_accum=1 run logs it)."""
    def run(name, accum):
        cfg = resolve_config("demo", None, demo_overrides(
            tmp_path, synth_dir, f"train.run_name={name}", "train.max_steps=0",
            "train.epochs=1", "checkpoint.every_steps=0", "checkpoint.at_end=false",
            "data.batch_size=4", f"optim.grad_accum={accum}", "optim.lr=0.0",
            "optim.warmup_ratio=0.0"))
        trainer = Trainer(cfg)
        result, seen = _train_counting_samples(trainer)
        return trainer, result, seen, read_metrics(trainer.run_dir)

    grouped, result, seen, rows = run("grouped", 3)
    assert grouped.total_steps == result.steps == 2 and sum(seen) == 16
    assert (grouped.loader.epoch, grouped.loader.position) == (1, 0)  # nothing drawn beyond
    single, _, _, single_rows = run("single", 1)
    assert len(single_rows) == 4
    assert rows[-1]["loss"] == pytest.approx(single_rows[-1]["loss"], rel=1e-5)
    assert rows[-1]["ntp"] == pytest.approx(single_rows[-1]["ntp"], rel=1e-5)


@pytest.mark.parametrize("rejected,accum,steps", [(5, 4, 4), (15, 1, 15)],
                         ids=["mid-epoch", "last-batch"])
def test_an_epoch_run_with_a_batch_rejected_whole_draws_nothing_past_the_epoch(
        tmp_path, rejected, accum, steps):
    """train.max_steps=0 at batch size 1, one sample's image missing: its batch is skipped and
    counted against the epoch, so the last step takes only what is left (3 micro-batches, or
    none: the run ends a step early) instead of the next epoch's first sample, trained twice."""
    from olavlm.train.build import synthetic_dataset_dir

    base = demo_overrides(tmp_path, tmp_path / "synthetic", "train.max_steps=0", "train.epochs=1",
                      "checkpoint.every_steps=0", "checkpoint.at_end=false", "data.shuffle=false",
                      "data.batch_size=1", f"optim.grad_accum={accum}", "train.stage=vpt",
                      "data.max_reject_fraction=1.0", "logging.every_steps=4")
    cfg = resolve_config("demo", None, base)
    root = synthetic_dataset_dir(cfg, is_main=True, barrier=lambda: None)
    entry = [json.loads(line) for line in (root / "train.jsonl").read_text().splitlines()]
    assert "image" in entry[rejected]
    (root / entry[rejected]["image"]).unlink()
    trainer = Trainer(cfg)
    assert trainer.total_steps == -(-16 // accum)
    result, seen = _train_counting_samples(trainer)
    assert result.steps == trainer.total_steps == steps
    # (the epoch closed at the end, nothing drawn from the next: its position is 0)
    assert seen == [1] * 15 and (trainer.loader.epoch, trainer.loader.position) == (1, 0)
    # every 4 steps and the last one logged (an early end too)
    logged = [*range(4, steps + 1, 4), *([steps] if steps % 4 else [])]
    assert [r["step"] for r in read_metrics(trainer.run_dir)] == logged


def test_a_run_resumed_in_epoch_mode_from_a_max_steps_leg_counts_its_epoch(tmp_path, synth_dir):
    """A checkpoint of a train.max_steps leg resumed with train.max_steps=0: the steps are
    counted from the epoch's data left, not the leg's max_steps (same batch geometry)."""
    base = demo_overrides(tmp_path, synth_dir, "train.run_name=legs", "data.batch_size=1",
                      "checkpoint.every_steps=0", "train.epochs=1", "data.shuffle=false")
    assert train_main([*base, "train.max_steps=3"]) == 0
    second = Trainer(resolve_config("demo", None, [*base, "train.max_steps=0"]))
    assert (second.step, second.total_steps) == (3, 16)
    result, seen = _train_counting_samples(second)
    assert result.steps == 16 and sum(seen) == 13


def test_an_epoch_run_resumed_after_a_batch_rejected_whole_keeps_its_schedule(tmp_path):
    """The resume recounted the steps from the data left, leaving out the batch rejected
    whole before the checkpoint, which the uninterrupted run's total still held: a shorter
    schedule from the first resumed step on. With the run's geometry unchanged the
    checkpoint's total is kept: the same learning rates and losses, step for step."""
    from olavlm.train.build import synthetic_dataset_dir

    base = demo_overrides(tmp_path, tmp_path / "synthetic", "train.max_steps=0", "train.epochs=1",
                      "checkpoint.every_steps=0", "data.shuffle=false", "data.batch_size=1",
                      "train.stage=vpt", "data.max_reject_fraction=1.0")
    root = synthetic_dataset_dir(resolve_config("demo", None, base), is_main=True,
                                 barrier=lambda: None)
    entry = [json.loads(line) for line in (root / "train.jsonl").read_text().splitlines()]
    (root / entry[5]["image"]).unlink()
    whole = Trainer(resolve_config("demo", None, [*base, "train.run_name=whole"]))
    planned = whole.total_steps
    _train_counting_samples(whole)
    first = Trainer(resolve_config("demo", None, [*base, "train.run_name=cut"]))
    log = first._log

    def log_then_preempt(*args):
        log(*args)
        if first.step == 7:  # (after the skipped sample 5)
            signal.raise_signal(signal.SIGTERM)

    first._log = log_then_preempt
    try:
        assert first.train().stopped == "SIGTERM"
    finally:
        first.close()
    second = Trainer(resolve_config("demo", None, [*base, "train.run_name=cut"]))
    assert second.step == 7 and second.total_steps == planned == 16
    _train_counting_samples(second)
    rows = {r["step"]: r for r in read_metrics(whole.run_dir)}
    resumed = {r["step"]: r for r in read_metrics(second.run_dir)}
    assert sorted(rows) == sorted(resumed) == list(range(1, 16))
    for step in rows:
        assert (resumed[step]["lr"], resumed[step]["loss"]) == (rows[step]["lr"],
                                                                rows[step]["loss"]), step


def test_logged_throughput_sums_the_ranks_counts(tmp_path, synth_dir, monkeypatch):
    """samples/s and tokens/s are the job's (every rank's counts summed at the logged step),
    not rank 0's times the number of ranks: ranks differ (truncated or rejected samples, an
    uneven last batch). A second rank with 1 sample and 100 tokens is emulated."""
    import torch

    cfg = resolve_config("demo", None, demo_overrides(
        tmp_path, synth_dir, "train.max_steps=1", "checkpoint.every_steps=0",
        "checkpoint.at_end=false"))
    trainer = Trainer(cfg)
    own = []
    tokens = trainer._tokens
    trainer._tokens = lambda batch: (lambda t: (own.append(t), t)[1])(tokens(batch))
    trainer.dist.world_size = 2  # (distributed: no process group, all_reduce emulated)
    peer = {torch.float64: torch.tensor([1.0, 100.0, 10_000.0, 50.0], dtype=torch.float64)}

    def all_reduce(tensor, op=torch.distributed.ReduceOp.SUM):
        if op == torch.distributed.ReduceOp.SUM:  # the peer: its counts, or the same values
            tensor.add_(peer[tensor.dtype] if tensor.dtype in peer else tensor)

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    monkeypatch.setattr(torch.distributed, "all_gather_object",
                        lambda out, obj: out.__setitem__(slice(None), [obj] * len(out)))
    try:
        trainer.train()
    finally:
        trainer.close()
    row = read_metrics(trainer.run_dir)[-1]
    samples, toks = sum(t[0] for t in own), sum(t[1] for t in own)
    assert samples != 1 and toks != 100  # the premise: the peer's counts differ
    assert row["samples_per_s"] / row["tokens_per_s"] == pytest.approx(
        (samples + 1) / (toks + 100), rel=1e-9)


def test_the_run_summary_sums_every_ranks_data_counts(tmp_path, synth_dir, monkeypatch):
    """summary.txt's data line is the job's: another rank's rejects and samples are in it
    (it held rank 0's counts only, and only when rank 0 itself had a problem)."""
    import torch

    cfg = resolve_config("demo", None, demo_overrides(
        tmp_path, synth_dir, "train.max_steps=1", "checkpoint.every_steps=0",
        "checkpoint.at_end=false"))
    trainer = Trainer(cfg)
    trainer.dist.world_size = 2  # (no process group: the collectives are emulated)
    peer = (0, {"counts": {"corrupt_image": 2}, "num_truncated": 1, "num_unlabelled": 0,
                "num_samples": 3, "num_dropped": 0, "target_counts": {}}, True)

    def all_gather_object(out, obj):
        out[0], out[1] = obj, peer

    def all_reduce(tensor, op=torch.distributed.ReduceOp.SUM):
        if op == torch.distributed.ReduceOp.SUM:
            tensor.add_(tensor)

    monkeypatch.setattr(torch.distributed, "all_gather_object", all_gather_object)
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    try:
        trainer.train()
    finally:
        trainer.close()
    own = trainer.loader.log.num_samples
    text = (trainer.run_dir / "summary.txt").read_text()
    assert f"data, 2 ranks: epoch 0: {own + 3} samples used" in text
    assert "2 rejected [corrupt_image=2]" in text and "1 truncated" in text
    assert "(so far) (ids in rejects*.jsonl)" in text


@pytest.mark.parametrize("where", ["a_file", "a_file/below"])
def test_an_output_dir_that_cannot_be_made_is_one_line(tmp_path, capsys, where):
    (tmp_path / "a_file").write_text("")
    out = tmp_path / where
    assert train_main([f"train.output_dir={out}", "train.max_steps=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"olavlm train: train.output_dir: cannot make the folder {str(out)!r}: ")
    assert "Traceback" not in err


def test_more_loader_workers_than_cpus_are_capped(monkeypatch, caplog):
    from olavlm.train.build import _worker_count

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert _worker_count(2) == 2
    with caplog.at_level("WARNING", logger="olavlm.train"):
        assert _worker_count(1_000_000) == 3
    assert "data.num_workers=1000000 is more than the 3 CPUs" in caplog.text


def test_a_restart_after_a_crash_before_the_first_checkpoint_lists_each_reject_once(tmp_path):
    """resume=auto with no checkpoint yet starts afresh in the crashed attempt's folder: the
    samples (and the index) it rejected are rejected again, so its lines are not kept."""
    from olavlm.train.build import synthetic_dataset_dir

    base = demo_overrides(tmp_path, tmp_path / "synthetic", "train.max_steps=4", "train.run_name=r",
                      "checkpoint.every_steps=2", "data.shuffle=false", "data.batch_size=2",
                      "data.max_reject_fraction=1.0", "checkpoint.resume=auto")
    cfg = resolve_config("demo", None, base)
    root = synthetic_dataset_dir(cfg, is_main=True, barrier=lambda: None)
    entries = [json.loads(line) for line in (root / "train.jsonl").read_text().splitlines()]
    (root / entries[0]["image"]).unlink()  # rejected in the first step
    (root / "train.jsonl").write_text((root / "train.jsonl").read_text() + "not json\n")

    class Crash(RuntimeError):
        pass

    first = Trainer(cfg)
    first.save_checkpoint = lambda: (_ for _ in ()).throw(Crash())  # dies at its first save
    with pytest.raises(Crash):
        first.train()
    first.close(barrier=False)
    rejects = first.run_dir / "rejects.jsonl"
    crashed = rejects.read_text().splitlines()
    assert len(crashed) == 2  # the index's bad line and the missing image
    Trainer(cfg).train()
    lines = rejects.read_text().splitlines()
    assert len(lines) == 2, [json.loads(x)["reason"] for x in lines]
