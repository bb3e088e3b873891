# The training job end to end on CPU: demo losses fall, exact resume, SIGTERM, non-finite guard.
from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from olavlm.config import resolve_config
from olavlm.train.cli import main as train_main
from olavlm.train.metrics import read_metrics
from olavlm.train.trainer import NonFiniteLossError, Trainer


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("synthetic")


def _cfg(tmp_path, synth_dir, *overrides):
    base = [f"train.output_dir={tmp_path / 'runs'}", f"data.synthetic_dir={synth_dir}",
            "data.synthetic_num=48", "logging.progress=false", "logging.plot=false"]
    return resolve_config("demo", None, base + list(overrides))


def _losses(run_dir):
    return {row["step"]: row for row in read_metrics(run_dir)}


@pytest.mark.slow
def test_demo_losses_decrease(tmp_path, synth_dir):
    cfg = _cfg(tmp_path, synth_dir, "train.max_steps=60", "checkpoint.every_steps=0",
               "logging.plot=true")
    trainer = Trainer(cfg)
    result = trainer.train()
    rows = read_metrics(result.run_dir)
    assert [r["step"] for r in rows] == list(range(1, 61))
    keys = ["ntp"] + [t for t in ("gen", "depth", "seg")]
    for key in keys:
        first = sum(r[key] for r in rows[:10]) / 10
        last = sum(r[key] for r in rows[-10:]) / 10
        assert last < first, f"{key}: {first:.4f} -> {last:.4f} did not decrease"
    for name in ("config.yaml", "environment.json", "summary.txt", "FINISHED"):
        assert (result.run_dir / name).exists() or (
            name == "config.yaml" and (result.run_dir / "config.json").exists()), name
    assert list(result.run_dir.glob("*.png")), "no loss plot"
    assert "ntp" in result.summary
    assert trainer.checkpointer.latest() is not None  # the final checkpoint


class _Crash(RuntimeError):
    pass


@pytest.mark.parametrize("every,crash_at,max_steps", [(4, 4, 8), (12, 12, 15), (2, 2, 8)],
                         ids=["mid_epoch", "at_the_epoch_end", "inside_the_warmup"])
def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path, synth_dir, every, crash_at,
                                                          max_steps):
    # 48 samples / batch 4: 12 steps an epoch. A checkpoint right after an epoch's last batch
    # holds position == dataset size; the resumed run must roll over into the next epoch.
    # Half the steps warm up (4 to 8 steps): the resume must keep the base lr, not the warm-up
    # fraction the optimizer's groups hold once the scheduler is built.
    common = (f"train.max_steps={max_steps}", f"checkpoint.every_steps={every}",
              "data.batch_size=4", "optim.warmup_ratio=0.5")
    full = Trainer(_cfg(tmp_path / "a", synth_dir, *common))
    full.train()
    want = _losses(full.run_dir)

    crashing = Trainer(_cfg(tmp_path / "b", synth_dir, *common, "train.run_name=job"))
    save = crashing.save_checkpoint

    def save_then_crash():
        path = save()
        if crashing.step == crash_at:
            raise _Crash(f"killed right after the step-{crash_at} checkpoint")
        return path

    crashing.save_checkpoint = save_then_crash
    with pytest.raises(_Crash):
        crashing.train()
    resumed = Trainer(_cfg(tmp_path / "b", synth_dir, *common, "train.run_name=job"))
    assert resumed.step == crash_at and resumed.resumed_from is not None
    resumed.train()
    got = _losses(resumed.run_dir)
    for step in range(crash_at + 1, max_steps + 1):
        for key in ("loss", "ntp", "gen", "depth", "seg", "grad_norm", "lr"):
            assert got[step][key] == want[step][key], (step, key, got[step][key],
                                                        want[step][key])


def test_sigterm_writes_a_checkpoint_and_stops(tmp_path, synth_dir):
    trainer = Trainer(_cfg(tmp_path, synth_dir, "train.max_steps=50", "checkpoint.every_steps=0",
                           "train.run_name=sig"))
    log = trainer._log

    def log_and_signal(scalars, window, seconds):
        log(scalars, window, seconds)
        if trainer.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    trainer._log = log_and_signal
    result = trainer.train()
    assert result.stopped == "SIGTERM" and result.steps == 3
    latest = trainer.checkpointer.latest()
    assert latest is not None and latest.name.endswith("3")
    assert not (trainer.run_dir / "FINISHED").exists()


def _poison(trainer, steps):
    forward = trainer.model.forward

    def poisoned(*args, **kwargs):
        out = forward(*args, **kwargs)
        if trainer.step + 1 in steps:
            out.loss = out.loss * float("nan")
            out.components["depth"] = out.components["depth"] * float("nan")
        return out

    trainer.model.forward = poisoned


def test_nonfinite_steps_are_skipped_then_stop_the_run(tmp_path, synth_dir):
    trainer = Trainer(_cfg(tmp_path, synth_dir, "train.max_steps=6", "checkpoint.every_steps=0",
                           "train.nonfinite_limit=3"))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()
              if p.requires_grad}
    _poison(trainer, {1})
    trainer.train()
    rows = _losses(trainer.run_dir)
    assert rows[1]["nonfinite_total"] == 1 and rows[6]["nonfinite_total"] == 1
    assert trainer.nonfinite_total == 1
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters()
               if n in before)

    stuck = Trainer(_cfg(tmp_path / "stuck", synth_dir, "train.max_steps=6",
                         "checkpoint.every_steps=0", "train.nonfinite_limit=3"))
    _poison(stuck, set(range(1, 7)))
    with pytest.raises(NonFiniteLossError, match=r"step 3: 3 non-finite steps in a row.*depth"
                       r".*no checkpoint was written yet"):  # (not a folder that is not there)
        stuck.train()


def test_nonfinite_steps_in_a_row_count_across_a_resume(tmp_path, synth_dir):
    common = ("train.max_steps=6", "checkpoint.every_steps=2", "train.nonfinite_limit=3",
              "train.run_name=nf")
    first = Trainer(_cfg(tmp_path, synth_dir, *common))
    _poison(first, {1, 2})
    save = first.save_checkpoint

    def save_then_crash():
        path = save()
        if first.step == 2:
            raise _Crash("killed after two non-finite steps and a checkpoint")
        return path

    first.save_checkpoint = save_then_crash
    with pytest.raises(_Crash):
        first.train()
    resumed = Trainer(_cfg(tmp_path, synth_dir, *common))
    assert resumed.step == 2 and resumed.nonfinite_run == 2
    _poison(resumed, {3})
    with pytest.raises(NonFiniteLossError, match=r"step 3: 3 non-finite steps in a row.*"
                       r"the last checkpoint is .*step_000002"):
        resumed.train()


def test_config_errors_fail_before_any_work(tmp_path, capsys):
    out = str(tmp_path / "runs")
    assert train_main(["--recipe", "nope", f"train.output_dir={out}"]) == 2
    assert "nope" in capsys.readouterr().err
    assert train_main([f"train.output_dir={out}", "optim.lrr=1"]) == 2
    assert "optim.lrr" in capsys.readouterr().err
    assert train_main([f"train.output_dir={out}", "model.llm=/no/such/model"]) == 2
    assert "/no/such/model" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.pt"))


def test_resolved_config_is_saved(tmp_path, synth_dir):
    trainer = Trainer(_cfg(tmp_path, synth_dir, "train.max_steps=1"))
    env = json.loads((trainer.run_dir / "environment.json").read_text())
    assert "torch" in json.dumps(env)
    trainable = json.loads((trainer.run_dir / "trainable.json").read_text())
    assert {row["module"] for row in trainable if row["trainable"]} >= {"mm_projector"}


@pytest.mark.parametrize("api", ["legacy", "fp32_precision"])
def test_close_and_a_failed_start_give_back_the_tf32_settings(tmp_path, synth_dir, monkeypatch,
                                                               api):
    """parallel.tf32 changes process-wide settings: a job run inside a larger program (a
    notebook, the GPU tests) hands the caller's fp32 precision back when it closes or fails to
    start, in whichever of torch's two APIs the caller used."""
    from olavlm.train import trainer as trainer_module
    from olavlm.train.parallel import set_tf32_state, tf32_state

    real = trainer_module.enable_tf32
    # The switch applies on CUDA only: hand enable_tf32 a CUDA device for these jobs.
    monkeypatch.setattr(trainer_module, "enable_tf32",
                        lambda cfg, device: real(cfg, torch.device("cuda")))
    caller = ("legacy", "highest", False) if api == "legacy" else \
        ("fp32_precision", "ieee", "ieee")
    enabled = ("legacy", "high", True) if api == "legacy" else \
        ("fp32_precision", "tf32", "tf32")
    set_tf32_state(caller)
    cfg = _cfg(tmp_path, synth_dir, "train.max_steps=1", "parallel.tf32=true")
    trainer = Trainer(cfg)
    assert tf32_state() == enabled
    trainer.close()
    assert tf32_state() == caller
    trainer.close()  # twice: nothing left to restore
    assert tf32_state() == caller

    def broken(*args, **kwargs):
        assert tf32_state() == enabled  # (the switch is on by the time the optimizer is built)
        raise ValueError("no optimizer today")

    monkeypatch.setattr(trainer_module, "build_optimizer", broken)
    with pytest.raises(ValueError, match="no optimizer today"):
        Trainer(_cfg(tmp_path / "failed", synth_dir, "train.max_steps=1", "parallel.tf32=true"))
    assert tf32_state() == caller
    monkeypatch.undo()
    # Off, or on the CPU: nothing is read or written.
    set_tf32_state(("legacy", "medium", False))
    Trainer(_cfg(tmp_path / "cpu", synth_dir, "train.max_steps=1", "parallel.tf32=true")).close()
    assert tf32_state() == ("legacy", "medium", False)


@pytest.mark.slow
@pytest.mark.parametrize("stage,llm_dtype", [("full", "float32"), ("pt", "bfloat16")])
def test_single_process_bf16_keeps_fp32_master_weights(tmp_path, synth_dir, stage, llm_dtype):
    """bf16 compute through a 1-rank FSDP2 group; PT's layout stores the frozen LLM in bf16."""
    trainer = Trainer(_cfg(tmp_path, synth_dir, "train.max_steps=3", "checkpoint.every_steps=0",
                           "parallel.mixed_precision=bf16", f"train.stage={stage}",
                           f"model.dtype={llm_dtype}", "model.trainable_dtype=float32"))
    try:
        assert "fsdp" in trainer.parallel_done
        result = trainer.train()
        rows = read_metrics(result.run_dir)
        assert len(rows) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
        # The optimizer updates fp32 parameters; FSDP2 casts them to bf16 for compute.
        trained = [p for p in trainer.model.parameters() if p.requires_grad]
        assert trained and all(p.dtype == torch.float32 for p in trained)
    finally:
        trainer.close()
    with pytest.raises(ValueError, match="needs FSDP2"):
        Trainer(_cfg(tmp_path / "off", synth_dir, "parallel.mixed_precision=bf16",
                     "parallel.fsdp=off"))


def test_gradient_accumulation_consumes_micro_batches(tmp_path, synth_dir, monkeypatch):
    from olavlm.models import ola

    seen = []  # (the host count each micro-batch's LM head got, the count it scored)

    def spy(*args, **kwargs):
        out = lce(*args, **kwargs)
        seen.append((kwargs["max_valid_tokens"], int(out.num_valid)))
        return out

    lce = ola.linear_cross_entropy
    monkeypatch.setattr(ola, "linear_cross_entropy", spy)
    trainer = Trainer(_cfg(tmp_path, synth_dir, "train.max_steps=3", "checkpoint.every_steps=0",
                           "optim.grad_accum=2", "data.batch_size=4", "data.shuffle=false"))
    trainer.train()
    assert [r["step"] for r in read_metrics(trainer.run_dir)] == [1, 2, 3]
    # Each micro-batch's own exact count sizes its fused LM head (max_valid_tokens).
    assert len(seen) == 6 and all(bound == scored > 0 for bound, scored in seen)
    state = trainer.loader.state_dict()
    assert state["epoch"] * 48 + state["position"] == 3 * 2 * 4  # 6 micro-batches of 4


def test_accumulated_next_token_loss_is_the_mean_over_the_step_tokens(tmp_path, synth_dir):
    """2 micro-batches of 2 score their next-token loss as the 4-sample batch does (every token
    of the step weighs the same); the synthetic samples' label counts differ."""
    common = ("train.max_steps=1", "checkpoint.every_steps=0", "checkpoint.at_end=false",
              "data.shuffle=false", "train.stage=pt")
    one = Trainer(_cfg(tmp_path / "one", synth_dir, *common, "data.batch_size=4"))
    one.train()
    two = Trainer(_cfg(tmp_path / "two", synth_dir, *common, "data.batch_size=2",
                       "optim.grad_accum=2"))
    state = two.loader.state_dict()
    it = iter(two.loader)
    counts = [int(two.model.count_supervised_tokens(x.input_ids, x.attention_mask, x.labels))
              for x in (next(it), next(it))]
    assert counts[0] != counts[1]  # else a mean of the micro-batch means would pass too
    two.loader.load_state_dict(state)  # the step starts from the first batch again
    two.train()
    a, b = _losses(one.run_dir)[1], _losses(two.run_dir)[1]
    assert a["ntp"] == pytest.approx(b["ntp"], rel=1e-5)


def test_batches_close_an_exhausted_epoch_but_reject_an_empty_dataset():
    class Loader:  # the ResumableLoader protocol: `position`, one pass per iter()
        def __init__(self, passes, position):
            self.passes, self.position = passes, position

        def __iter__(self):
            batches = self.passes.pop(0)
            yield from batches
            self.position = 0

    class Owner:
        _batches = Trainer._batches
        micro_batches_left = None  # (train.max_steps mode)

    owner = Owner()
    owner.loader = Loader([[], ["a", "b"]], position=16)  # resumed at the epoch's end
    it = owner._batches()
    assert [next(it), next(it)] == ["a", "b"]
    owner.loader = Loader([[]], position=0)
    with pytest.raises(RuntimeError, match="yields no batches"):
        next(owner._batches())


def test_sdpa_backend_with_activation_checkpointing_trains(tmp_path, synth_dir):
    """The checkpointed blocks recompute attention in the backward: it must run under the same
    SDPA backend as the forward (another one saves tensors of other shapes)."""
    trainer = Trainer(_cfg(tmp_path, synth_dir, "train.max_steps=1", "checkpoint.at_end=false",
                           "parallel.sdpa_backend=math",
                           "parallel.activation_checkpointing=full"))
    trainer.train()
    assert torch.isfinite(torch.tensor(_losses(trainer.run_dir)[1]["loss"]))


def test_a_fresh_start_never_overwrites_a_run_and_a_resume_keeps_the_old_config(tmp_path,
                                                                                 synth_dir):
    common = ("train.max_steps=2", "checkpoint.every_steps=2", "train.run_name=r")
    first = Trainer(_cfg(tmp_path, synth_dir, *common, "optim.lr=1e-3"))
    first.train()
    run = first.run_dir
    metrics = (run / "metrics.jsonl").read_text()
    config = (run / "config.yaml").read_text()
    # checkpoint.resume=none into the same folder: refused before anything is written
    with pytest.raises(ValueError, match=r"already holds a run \(latest checkpoint step_000002"):
        Trainer(_cfg(tmp_path, synth_dir, *common, "checkpoint.resume=none", "optim.lr=5e-4"))
    assert (run / "metrics.jsonl").read_text() == metrics
    assert (run / "config.yaml").read_text() == config
    assert not (run / "config.1.yaml").exists()
    # resuming with another setting: config.yaml is the new one, the first leg's is kept
    resumed = Trainer(_cfg(tmp_path, synth_dir, *common, "checkpoint.resume=auto",
                           "optim.lr=5e-4", "train.max_steps=3"))
    assert resumed.step == 2
    assert (run / "config.1.yaml").read_text() == config
    assert (run / "environment.1.json").exists()
    assert "0.0005" in (run / "config.yaml").read_text()
    # ... and the new lr is the one that runs (the checkpoint's optimizer groups and schedule
    # held the old one), with a warning naming the change
    assert [g["initial_lr"] for g in resumed.optimizer.param_groups] == \
        [5e-4] * len(resumed.optimizer.param_groups)
    assert resumed.scheduler.base_lrs == [5e-4] * len(resumed.scheduler.base_lrs)


def test_a_resume_with_a_new_lr_follows_the_new_schedule_and_says_so(tmp_path, synth_dir,
                                                                      caplog):
    """Resuming with optim.lr changed continues as a fresh run with that lr would at this step
    (constant schedule: the lr is the new one from the first resumed step), and warns."""
    common = ("train.max_steps=4", "checkpoint.every_steps=2", "train.run_name=r",
              "optim.schedule=constant", "optim.warmup_ratio=0")
    first = Trainer(_cfg(tmp_path, synth_dir, *common, "train.max_steps=2"))
    first.train()
    (first.run_dir / "FINISHED").unlink(missing_ok=True)
    with caplog.at_level("WARNING", logger="olavlm.train"):
        resumed = Trainer(_cfg(tmp_path, synth_dir, *common, "optim.lr=3e-4"))
    assert "optim.lr: 0.001 -> 0.0003" in caplog.text
    assert "train.max_steps: 2 -> 4" in caplog.text
    resumed.train()
    lrs = {row["step"]: row["lr"] for row in read_metrics(resumed.run_dir)}
    assert lrs[2] == pytest.approx(1e-3) and lrs[3] == pytest.approx(3e-4), lrs


def test_a_resume_into_another_stage_is_refused_before_anything_changes(tmp_path, synth_dir,
                                                                        capsys):
    """The checkpoint's optimizer trained other parameters (stage full -> pt): a clear error
    pointing at checkpoint.init_from, not a KeyError inside AdamW; config.yaml unchanged."""
    common = ("train.max_steps=2", "checkpoint.every_steps=2", "train.run_name=r")
    first = Trainer(_cfg(tmp_path, synth_dir, *common, "train.stage=full"))
    first.train()
    config = (first.run_dir / "config.yaml").read_text()
    base = [f"train.output_dir={tmp_path / 'runs'}", f"data.synthetic_dir={synth_dir}",
            "data.synthetic_num=48", "logging.progress=false", "logging.plot=false"]
    rc = train_main(["--recipe", "demo", *base, *common, "train.stage=pt",
                     "train.max_steps=3"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "trainable parameters changed" in err and "checkpoint.init_from=" in err, err
    assert (first.run_dir / "config.yaml").read_text() == config


def test_a_second_trainer_into_a_busy_run_folder_is_refused(tmp_path, synth_dir):
    """Rank 0 locks the run folder while it trains; a second job into it stops at once with a
    clear error (exit 2 from the CLI), and the lock goes when the first one is done."""
    common = ("train.max_steps=2", "checkpoint.every_steps=2", "train.run_name=busy")
    first = Trainer(_cfg(tmp_path, synth_dir, *common))
    metrics = first.run_dir / "metrics.jsonl"
    with pytest.raises(ValueError, match="in use by another training process"):
        Trainer(_cfg(tmp_path, synth_dir, *common, "train.max_steps=3"))
    assert first.run_dir.is_dir()  # the refused start removed nothing
    first.train()
    rows = metrics.read_text()
    again = Trainer(_cfg(tmp_path, synth_dir, *common, "train.max_steps=3"))  # free now
    again.train()
    assert metrics.read_text().startswith(rows)


def test_steps_without_answer_tokens_are_reported(tmp_path, synth_dir, caplog):
    """model.max_length cuts every answer: the steps still run (the embedding losses train),
    and the run says that the next-token loss has nothing to train on."""
    cfg = _cfg(tmp_path, synth_dir, "train.max_steps=2", "checkpoint.every_steps=0",
               "checkpoint.at_end=false", "model.max_length=10")
    with caplog.at_level("WARNING", logger="olavlm.train"):
        Trainer(cfg).train()
    assert "step 1: no supervised (answer) tokens" in caplog.text, caplog.text
    assert "step 2:" not in caplog.text  # said at the 1st, 10th, 100th... such step


def test_a_file_system_without_locks_trains_without_the_lock(tmp_path, synth_dir, monkeypatch,
                                                             caplog):
    """flock failing for another reason than a holder (ENOLCK: Lustre without -o flock) must
    not be reported as "in use": the run warns and trains."""
    import errno
    import fcntl

    def no_locks(*_args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level("WARNING", logger="olavlm.train"):
        trainer = Trainer(_cfg(tmp_path, synth_dir, "train.max_steps=1",
                               "checkpoint.every_steps=0", "checkpoint.at_end=false"))
    assert "training without the run-folder lock" in caplog.text
    assert trainer.train().steps == 1


def test_rerunning_a_resume_from_a_path_continues_the_run_not_the_path(tmp_path, synth_dir):
    """A run started with checkpoint.resume=PATH (from another run) and stopped is continued
    by the same command from its own latest checkpoint, not sent back to PATH: also when its
    last checkpoint is at PATH's step, and once PATH has been pruned. A folder holding a run
    that did not start from PATH is refused, untouched, whatever its steps."""
    import shutil

    base = Trainer(_cfg(tmp_path, synth_dir, "train.max_steps=2", "checkpoint.every_steps=1",
                        "train.run_name=base"))
    base.train()
    path = base.run_dir / "checkpoints" / "step_000002"
    branch = ("train.run_name=branch", f"checkpoint.resume={path}", "checkpoint.every_steps=0")
    first = Trainer(_cfg(tmp_path, synth_dir, *branch, "train.max_steps=2"))
    assert first.step == 2
    first.train()  # its only checkpoint: its final step_2 (PATH's step)
    again = Trainer(_cfg(tmp_path, synth_dir, *branch, "train.max_steps=3"))
    assert again.step == 2 and again.resumed_from.parent == again.run_dir / "checkpoints"
    again.train()  # (as a stopped leg: its last checkpoint is step 3)
    shutil.rmtree(path)  # the source run pruned PATH
    third = Trainer(_cfg(tmp_path, synth_dir, *branch, "train.max_steps=4"))
    assert third.step == 3 and third.resumed_from.name == "step_000003"
    third.close()
    early = base.run_dir / "checkpoints" / "step_000001"
    for steps in (1, 4):  # another run's checkpoints, earlier or later than PATH's step
        other = Trainer(_cfg(tmp_path, synth_dir, f"train.max_steps={steps}",
                             "checkpoint.every_steps=0", f"train.run_name=other{steps}"))
        other.train()
        metrics = (other.run_dir / "metrics.jsonl").read_text()
        with pytest.raises(ValueError, match="did not start from checkpoint.resume="):
            Trainer(_cfg(tmp_path, synth_dir, f"train.run_name=other{steps}",
                         f"checkpoint.resume={early}", "train.max_steps=5"))
        assert (other.run_dir / "metrics.jsonl").read_text() == metrics


def test_the_stop_message_says_how_to_resume(tmp_path):
    from olavlm.train.trainer import how_to_resume

    run = tmp_path / "runs" / "r"
    elsewhere = tmp_path / "other" / "checkpoints" / "step_000002"
    own = run / "checkpoints" / "step_000002"

    def hint(*overrides):
        cfg = resolve_config("demo", None, [f"train.output_dir={tmp_path / 'runs'}",
                                            *overrides])
        return how_to_resume(cfg, run)

    assert hint("checkpoint.resume=auto") == "rerun the same command"
    assert hint("train.run_name=r", f"checkpoint.resume={elsewhere}") == \
        "rerun the same command"
    # a timestamped folder is new at each start; a PATH of its own would branch again; none
    # is refused over a run
    for overrides in ([f"checkpoint.resume={elsewhere}"],
                      ["train.run_name=r", f"checkpoint.resume={own}"],
                      ["train.run_name=r", "checkpoint.resume=none"]):
        assert hint(*overrides) == "rerun with train.run_name=r --resume auto", overrides


def test_an_extended_finished_run_is_found_by_resume_auto_again(tmp_path, synth_dir):
    """Training a finished run further clears its FINISHED marker (until it finishes again):
    stopped midway, `--resume auto` without a run name finds it again."""
    first = Trainer(_cfg(tmp_path, synth_dir, "train.max_steps=1", "checkpoint.every_steps=1"))
    first.train()
    assert (first.run_dir / "FINISHED").exists()
    more = Trainer(_cfg(tmp_path, synth_dir, "train.max_steps=2",
                        f"train.run_name={first.run_dir.name}", "checkpoint.resume=auto"))
    assert not (first.run_dir / "FINISHED").exists()
    more.close()
    found = Trainer(_cfg(tmp_path, synth_dir, "train.max_steps=2", "checkpoint.resume=auto"))
    assert found.run_dir == first.run_dir and found.step == 1
    found.close()


def test_resume_auto_picks_the_run_whose_checkpoints_changed_last(tmp_path):
    """Without a run name, `--resume auto` continues the unfinished run whose checkpoints were
    written last, whatever the folder names sort as."""
    import types

    from olavlm.train.trainer import _run_dir

    out = tmp_path / "runs"
    stamps = {"demo-ablation-lr": 1_000, "demo-20261128-100000-10": 2_000,
              "demo-20261128-100000-2": 3_000, "demo-20261128-100000": 500}
    for name, t in stamps.items():
        ckpts = out / name / "checkpoints"
        (ckpts / "step_000010").mkdir(parents=True)
        os.utime(ckpts, (t, t))
    cfg = resolve_config("demo", None, [f"train.output_dir={out}", "checkpoint.resume=auto"])
    dist = types.SimpleNamespace(is_main=True, distributed=False)
    assert _run_dir(cfg, dist)[0].name == "demo-20261128-100000-2"
    (out / "demo-20261128-100000-2" / "FINISHED").write_text("10\n")
    assert _run_dir(cfg, dist)[0].name == "demo-20261128-100000-10"


def test_the_logged_lr_is_optim_lr_and_own_group_lrs_are_logged_apart(tmp_path, synth_dir):
    """`lr` was the first parameter group's, the heads' in stage pt/full: with head_lr set
    it showed head_lr. It is optim.lr under the schedule; lr/heads and lr/projector are logged
    where they have their own, and equal what their groups update with."""
    trainer = Trainer(_cfg(tmp_path, synth_dir, "train.max_steps=3", "optim.lr=1e-3",
                           "optim.head_lr=1e-4", "optim.projector_lr=5e-4",
                           "optim.schedule=cosine", "optim.warmup_ratio=0.34",
                           "checkpoint.every_steps=0", "train.stage=full"))
    factors = []  # what each group really updates with, by role
    trainer.optimizer.register_step_pre_hook(lambda opt, args, kwargs: factors.append(
        {g["role"]: g["lr"] for g in opt.param_groups}))
    trainer.train()
    rows = read_metrics(trainer.run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row, used in zip(rows, factors, strict=True):
        scale = used["llm"] / 1e-3
        assert row["lr"] == pytest.approx(used["llm"])
        assert row["lr/heads"] == pytest.approx(1e-4 * scale) == pytest.approx(used["heads"])
        assert row["lr/projector"] == pytest.approx(used["projector"])
    assert rows[0]["lr"] < rows[1]["lr"]  # warm-up, then cosine: the schedule is in it
