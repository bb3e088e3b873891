# `olavlm train` as a user meets it: argument order, bad resume paths, rejected batches.
from __future__ import annotations

import pytest

import olavlm.train.cli as train_cli
from olavlm.cli import main as olavlm_main
from olavlm.train.cli import main as train_main


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
