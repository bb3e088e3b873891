# `olavlm train` as a user meets it: argument order, bad resume paths, rejected batches.
from __future__ import annotations

import dataclasses
import json

import pytest

import olavlm.train.cli as train_cli
from olavlm.cli import main as olavlm_main
from olavlm.config import resolve_config
from olavlm.recipes import RECIPES
from olavlm.train.cli import main as train_main
from olavlm.train.trainer import NoDataError, Trainer


@pytest.mark.parametrize("entry", ["olavlm", "olavlm.train"])
def test_overrides_after_an_option_are_taken_in_order(entry, monkeypatch):
    got = {}

    def fake_run_train(args):
        got["overrides"], got["resume"] = list(args.overrides), args.resume
        return 0

    monkeypatch.setattr(train_cli, "run_train", fake_run_train)
    argv = ["a.b=1", "--resume", "none", "c.d=2", "--recipe", "demo", "e.f=3"]
    if entry == "olavlm":
        assert olavlm_main(["train", *argv]) == 0
    else:
        assert train_main(argv) == 0
    assert got == {"overrides": ["a.b=1", "c.d=2", "e.f=3"], "resume": "none"}


def test_unknown_options_are_still_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        olavlm_main(["train", "a.b=1", "--resume", "none", "--bogus"])
    assert exc.value.code == 2 and "--bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        olavlm_main(["data", "synth", "--out", "x", "--num", "1", "c.d=2"])


def test_a_late_bad_override_is_a_config_error(tmp_path, capsys):
    out = tmp_path / "runs"
    assert train_main([f"train.output_dir={out}", "--resume", "none", "optim.lrr=1"]) == 2
    assert "optim.lrr" in capsys.readouterr().err
    assert not out.exists()


def test_resume_from_a_bad_path_fails_before_any_work(tmp_path, capsys):
    out = tmp_path / "runs"
    assert train_main([f"train.output_dir={out}", "--resume", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "Traceback" not in err
    assert not out.exists()  # no run directory, no model built

    run = tmp_path / "old" / "demo-1"  # a run directory is not a checkpoint: say how to go on
    (run / "checkpoints").mkdir(parents=True)
    assert train_main([f"train.output_dir={out}", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"train.run_name={run.name}" in err and "--resume auto" in err


def test_a_batch_of_rejected_samples_is_skipped(tmp_path, caplog):
    """batch size 1 and one missing image: the run trains on, the reject is counted (it
    crashed in count_supervised_tokens on the empty batch)."""
    from olavlm.data.synthetic import write_synthetic_dataset

    data = tmp_path / "d"
    write_synthetic_dataset(data, 6, size=32, text_only_fraction=0.0)
    first = json.loads((data / "train.jsonl").read_text().splitlines()[1])
    (data / first["image"]).unlink()
    cfg = resolve_config("demo", None, [
        f"train.output_dir={tmp_path / 'runs'}", f"data.path={data / 'train.jsonl'}",
        f"data.tokenizer={data / 'tokenizer'}", "data.batch_size=1", "data.shuffle=false",
        "train.max_steps=3", "checkpoint.at_end=false", "logging.progress=false",
        "logging.plot=false"])
    trainer = Trainer(cfg)
    with caplog.at_level("WARNING", logger="olavlm.train"):
        result = trainer.train()
    assert result.steps == 3
    assert trainer.loader.log.counts == {"missing_image": 1}
    assert "every sample of a batch was rejected (missing_image): skipped" in caplog.text
    # The run stops inside its epoch: the epoch's rejects are still reported at the end (in
    # the log and in summary.txt), not only when an epoch completes.
    assert "missing_image=1" in caplog.text and "(so far)" in caplog.text
    assert "missing_image=1" in (result.run_dir / "summary.txt").read_text()


def test_only_rejected_batches_name_the_reasons_and_ranks_cannot_skip():
    class Rejected:
        reason = "missing_image"

        def message(self):
            return "train.jsonl:3: sample 'a7': missing_image: images/a7.png"

    class Empty:
        rejects = [Rejected()]

        def __len__(self):
            return 0

    class Loader:
        position = 0
        last_summary = "0 samples used, 2 rejected [missing_image=2]"

        def __iter__(self):
            yield from (Empty(), Empty())

        def stand_in_batch(self):
            raise ValueError("the template left no room")

    class Dist:
        distributed, rank = False, 0

    class Owner:
        _batches = Trainer._batches
        _empty_batch = Trainer._empty_batch
        micro_batches_left = None  # (train.max_steps mode)

    owner = Owner()
    owner.loader, owner.dist = Loader(), Dist()
    with pytest.raises(NoDataError, match=r"every sample rejected\?\): 0 samples used, 2 rej"):
        next(owner._batches())
    owner.dist.distributed, owner.dist.rank = True, 1
    # Before a batch of its own the loader makes a stand-in up; when even that fails, the
    # samples and the reason are named.
    with pytest.raises(NoDataError, match="rank 1: every sample of a batch was rejected "
                                          r"\(missing_image\) before this rank had a batch .*"
                                          r"sample 'a7'.*no stand-in sample either: ValueError: "
                                          r"the template left no room\): restore or replace"):
        next(owner._batches())


def test_a_rank_runs_a_stand_in_for_a_batch_rejected_whole(tmp_path):
    """With several ranks a batch rejected whole cannot be skipped on one rank alone: its
    previous batch runs in its place with nothing to learn from (no gradient, no loss, not
    counted as samples), so the step goes on with the other ranks' samples."""
    import torch

    cfg = resolve_config("demo", None, [
        f"train.output_dir={tmp_path / 'runs'}", f"data.synthetic_dir={tmp_path / 'syn'}",
        "data.synthetic_num=8", "train.max_steps=1", "checkpoint.at_end=false",
        "logging.progress=false", "logging.plot=false"])
    trainer = Trainer(cfg)
    try:
        real = next(iter(trainer.loader))
        assert int(real.image_mask.sum()) > 0  # the premise: images with targets to learn
        empty = dataclasses.replace(real, input_ids=real.input_ids[:0], rejects=[])
        trainer._last_batch = real
        trainer.dist.world_size = 2  # (the distributed branch; no collective is called)
        stand_in = trainer._empty_batch(empty)
        assert stand_in.stand_in and len(stand_in) == len(real)
        trainer.model.zero_grad(set_to_none=True)
        out = trainer._micro_step(stand_in, 1, torch.ones((), dtype=torch.int64), 0)
        assert float(out.loss.detach()) == 0.0 and int(out.num_valid_tokens) == 0
        grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
        assert grads and all(torch.count_nonzero(g) == 0 for g in grads)
        # Before a batch of its own (a run's or a resumed run's first batch): a text-only
        # sample the loader makes up, with the views, targets and maps of a real one, and the
        # loader's position and counts unchanged.
        trainer._last_batch = None
        position, used = trainer.loader.position, trainer.loader.log.num_samples
        made_up = trainer._empty_batch(empty)
        assert made_up.stand_in and len(made_up) == 1 and made_up.sample_ids == ["stand-in"]
        assert int(made_up.image_mask.sum()) == 0 and int(made_up.target_mask.sum()) == 0
        assert bool((made_up.labels == -100).all()) and made_up.attention_mask.any()
        assert made_up.maps.keys() == real.maps.keys()
        assert made_up.images.shape[1:] == real.images.shape[1:]
        assert (trainer.loader.position, trainer.loader.log.num_samples) == (position, used)
        trainer.model.zero_grad(set_to_none=True)
        out = trainer._micro_step(made_up, 1, torch.ones((), dtype=torch.int64), 0)
        assert float(out.loss.detach()) == 0.0 and int(out.num_valid_tokens) == 0
        grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
        assert grads and all(torch.count_nonzero(g) == 0 for g in grads)
    finally:
        trainer.dist.world_size = 1
        trainer.close()


def test_a_wrong_image_folder_stops_the_run_instead_of_training_on_the_rest(tmp_path, capsys):
    """Every image sample rejected (missing_image) and the text-only ones left: the run stops
    once more than data.max_reject_fraction of the samples are rejected, saying why."""
    from olavlm.data.synthetic import write_synthetic_dataset

    data = tmp_path / "d"
    write_synthetic_dataset(data, 100, size=32)
    (tmp_path / "wrong").mkdir()  # (a folder that does not exist is refused before any work)
    args = [f"train.output_dir={tmp_path / 'runs'}", f"data.path={data / 'train.jsonl'}",
            f"data.tokenizer={data / 'tokenizer'}", f"data.image_folder={tmp_path / 'wrong'}",
            "train.max_steps=20", "logging.progress=false", "logging.plot=false"]
    assert train_main(args) == 1
    err = capsys.readouterr().err
    assert "were rejected" in err and "missing_image=" in err and "max_reject_fraction" in err
    assert "Traceback" not in err


def test_a_rank_without_data_leaves_without_a_barrier(monkeypatch, capsys):
    """A NoDataError may be one rank's alone (its batch all rejected, its share of rejects over
    the limit): the others are in the step's collectives, so a barrier would hold this rank
    until the process group's timeout instead of exiting (and torchrun stopping the job)."""
    calls = []

    class FakeTrainer:
        def __init__(self, cfg):
            self.metrics = type("M", (), {"close": lambda self: None})()

        def train(self):
            raise NoDataError("rank 1: every sample of a batch was rejected (missing_image)")

        close = Trainer.close
        _unlock = Trainer._unlock
        _restore_tf32 = Trainer._restore_tf32

    import torch.distributed as tdist

    import olavlm.train.trainer as trainer_mod

    monkeypatch.setattr(trainer_mod, "Trainer", FakeTrainer)
    monkeypatch.setattr(tdist, "is_initialized", lambda: True)
    monkeypatch.setattr(tdist, "barrier", lambda *a, **k: calls.append("barrier"))
    monkeypatch.setattr(tdist, "destroy_process_group", lambda *a, **k: calls.append("destroy"))
    assert train_main(["logging.progress=false"]) == 1
    assert "rank 1: every sample" in capsys.readouterr().err
    assert calls == ["destroy"]


def test_a_peer_gone_during_the_start_is_one_line(monkeypatch, capsys):
    """Another rank dies while the ranks set up together (a collective in Trainer()): one line
    naming this rank, not a traceback hiding the cause; one process re-raises (a real bug)."""
    import olavlm.train.trainer as trainer_mod

    class FakeTrainer:
        def __init__(self, cfg):
            raise RuntimeError("[../third_party/gloo/transport/tcp/pair.cc:534] Connection "
                               "closed by peer [127.0.0.1]:5678")

    monkeypatch.setattr(trainer_mod, "Trainer", FakeTrainer)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert train_main(["logging.progress=false"]) == 1
    err = capsys.readouterr().err
    assert "rank 1: another rank stopped while the ranks were starting" in err
    assert "Traceback" not in err
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(RuntimeError, match="closed by peer"):
        train_main(["logging.progress=false"])


def test_a_failed_start_leaves_no_run_folder_but_keeps_an_existing_one(tmp_path, capsys):
    out = tmp_path / "runs"
    synth = f"data.synthetic_dir={tmp_path / 'synth'}"
    assert train_main([f"train.output_dir={out}", synth, "model.llm=/no/such/model"]) == 2
    assert "/no/such/model" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())  # no config.yaml-only folder left
    mine = out / "mine"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("the user's own file")
    assert train_main([f"train.output_dir={out}", synth, "train.run_name=mine",
                       "model.llm=/no/such/model"]) == 2
    assert (mine / "notes.txt").read_text() == "the user's own file"  # not ours to delete


def test_data_and_tokenizer_paths_are_checked_by_their_keys(tmp_path, capsys):
    """A dataset folder as data.path, a file that is not .json/.jsonl, a folder without a
    tokenizer: each stops the start with the key, what came and (for a data synth folder)
    the keys to pass instead, exit 2."""
    from olavlm.data.synthetic import write_synthetic_dataset

    data = tmp_path / "d"
    write_synthetic_dataset(data, 2, size=32)
    out = [f"train.output_dir={tmp_path / 'runs'}", "logging.progress=false"]
    tok = f"data.tokenizer={data / 'tokenizer'}"
    cases = [
        ([f"data.path={data}", tok],
         f"data.path: expected .json/.jsonl files (comma-separated), got the directory "
         f"'{data}'; for a dataset folder written by `olavlm data synth` pass "
         f"data.path={data / 'train.jsonl'} data.tokenizer={data / 'tokenizer'}"),
        ([f"data.path={data / 'meta.json'},{data / 'tokenizer' / 'tokenizer.json'}x", tok],
         "does not exist"),
        ([f"data.path={data / 'train.jsonl'}", f"data.tokenizer={data}"],
         f"data.tokenizer: '{data}' holds no tokenizer"),
    ]
    (data / "notes.txt").write_text("not data")
    cases.append(([f"data.path={data / 'notes.txt'}", tok],
                  f"data.path: expected .json/.jsonl files (comma-separated), got "
                  f"'{data / 'notes.txt'}'"))
    for overrides, expected in cases:
        assert train_main(out + overrides) == 2, overrides
        err = capsys.readouterr().err
        assert expected in err, err


def test_timestamped_run_folders_are_never_shared(tmp_path, monkeypatch):
    """Two jobs started in the same second without a run_name get two folders: a failed start
    of one must not delete the other's."""
    import datetime as dt

    from olavlm.train import trainer as trainer_module
    from olavlm.train.parallel import DistInfo

    class Frozen(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 11, 27, 12, 0, 0)

    monkeypatch.setattr(trainer_module._dt, "datetime", Frozen)
    cfg = resolve_config("demo", None, [f"train.output_dir={tmp_path}", "checkpoint.resume=none"])
    single = DistInfo()
    first, made_first = trainer_module._run_dir(cfg, single)
    second, made_second = trainer_module._run_dir(cfg, single)
    assert first.name == "demo-20261127-120000" and second.name == "demo-20261127-120000-2"
    assert made_first and made_second


@pytest.mark.parametrize("workers", [0, 2])
def test_a_bad_sample_under_raise_stops_with_one_line(tmp_path, capsys, workers):
    """data.on_bad_sample=raise: exit 1 with the sample's message, not a DataLoader worker's
    re-raised traceback."""
    from olavlm.data.synthetic import write_synthetic_dataset

    data = tmp_path / "d"
    write_synthetic_dataset(data, 6, size=32, text_only_fraction=0.0)
    first = json.loads((data / "train.jsonl").read_text().splitlines()[1])
    (data / first["image"]).unlink()
    args = [f"train.output_dir={tmp_path / 'runs'}", f"data.path={data / 'train.jsonl'}",
            f"data.tokenizer={data / 'tokenizer'}", "data.batch_size=2", "data.shuffle=false",
            "data.on_bad_sample=raise", f"data.num_workers={workers}", "train.max_steps=3",
            "checkpoint.at_end=false", "logging.progress=false", "logging.plot=false"]
    assert train_main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert err[0].startswith("olavlm train: ") and first["image"].split("/")[-1] in err[0], err
    assert "BadSampleError" not in err[0], err


def test_a_second_ctrl_c_stops_with_one_line_naming_the_checkpoint(tmp_path, capsys,
                                                                   monkeypatch):
    """Ctrl-C twice raises KeyboardInterrupt mid-step: one line saying where the last
    checkpoint is and how to go on (exit 130), not a traceback; the run is not FINISHED and
    the same command resumes it."""
    real = Trainer._micro_step

    def interrupted(self, *args, **kwargs):
        if self.step == 2:
            raise KeyboardInterrupt("second SIGINT: stopping now")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "_micro_step", interrupted)
    argv = [f"train.output_dir={tmp_path}", f"data.synthetic_dir={tmp_path / 'synth'}",
            "data.synthetic_num=24", "train.max_steps=4", "checkpoint.every_steps=1",
            "train.run_name=r", "logging.progress=false", "logging.plot=false"]
    assert train_main(argv) == 130
    err = capsys.readouterr().err
    assert "stopped at once by a second Ctrl-C during step 3" in err, err
    assert "step_000002" in err and "Traceback" not in err
    assert not (tmp_path / "r" / "FINISHED").exists()
    monkeypatch.setattr(Trainer, "_micro_step", real)
    assert train_main(argv + ["--resume", "auto"]) == 0
    assert (tmp_path / "r" / "FINISHED").read_text().strip() == "4"


def test_list_recipes_shows_what_each_trains_and_refuses_overrides(capsys):
    assert train_main(["--list-recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line for line in lines[1:-1]}
    assert set(rows) | {"pt", "vpt", "ift"} == set(RECIPES)
    for name, line in rows.items():  # each line reads the recipe's own values
        cfg = RECIPES[name]()
        assert line.split()[1:4] == [cfg.train.stage, cfg.model.llm, cfg.model.vision_tower]
        assert f"{cfg.data.batch_size} x {cfg.optim.grad_accum}" in line, name
    assert lines[-1].startswith("aliases: ") and "pt = llama3_8b_clip_pt" in lines[-1]
    # An override next to the listing would be silently ignored: refused instead.
    assert train_main(["--list-recipes", "optim.lr=1"]) == 2
    assert "optim.lr=1" in capsys.readouterr().err
