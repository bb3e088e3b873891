# `olavlm data|targets`: bad arguments and inputs give the message and exit status 2, not a
# traceback.
from __future__ import annotations

import pytest

from olavlm.cli import main


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "synth"
    assert main(["data", "synth", "--out", str(out), "--num", "4", "--size", "32",
                 "--workers", "1"]) == 0
    return out


@pytest.mark.parametrize("argv,expected", [
    (["data", "synth", "--out", "{synth}", "--num", "4"], "--overwrite"),
    (["data", "synth", "--out", "{tmp}/new", "--num", "0"], ": --num must be an int >= 1, got 0"),
    (["data", "check", "{tmp}/none.jsonl", "--tokenizer", "{synth}/tokenizer"],
     "DATA (the data files to check) must be existing ('.json', '.jsonl') files, got "),
    (["data", "check", "{synth}/train.jsonl", "--tokenizer", "{tmp}/none"],
     "--tokenizer: expected a local tokenizer folder"),
    (["data", "check", "{synth}/train.jsonl", "--tokenizer", "{synth}"],
     "--tokenizer: '{synth}' holds no tokenizer (none of tokenizer.json, "),
    (["data", "check", "{synth}/train.jsonl", "--tokenizer", "{broken}"],
     "--tokenizer: could not load the tokenizer in '{broken}': "),
    (["data", "check", "{synth}/train.jsonl", "--tokenizer", "{synth}/tokenizer",
      "--template", "nope"], "got 'nope'"),
    (["targets", "extract", "--data", "{synth}/train.jsonl", "--teachers", "nope", "--out",
      "{tmp}/t"], "got 'nope'"),
    (["targets", "extract", "--data", "{synth}/train.jsonl", "--teachers", "synthetic",
      "--out", "{tmp}/t", "--shard-size", "0"], ": --shard-size must be an int >= 1"),
    (["targets", "extract", "--data", "{tmp}/none.jsonl", "--teachers", "synthetic", "--out",
      "{tmp}/t"], ": --data must be existing"),
    (["targets", "extract", "--data", "{synth}/train.jsonl", "--teachers", "synthetic",
      "--out", "{tmp}/t", "--dtype", "fp8"], ": --dtype must be one of ['auto', 'bf16', "),
    (["targets", "extract", "--data", "{synth}/train.jsonl", "--teachers", "synthetic",
      "--out", "{tmp}/t", "--dtype", "gen=bf16"],
     ": --dtype name teachers that are not used: ['gen']"),
    (["targets", "extract", "--data", "{synth}/train.jsonl", "--teachers", "synthetic",
      "--out", "{tmp}/t", "--dtype", "synthetic=half"],
     ": --dtype must give each teacher one of ['bf16', 'fp16', 'fp32'], got 'half'"),
    (["targets", "verify", "{tmp}/none"], "is not a target cache"),
], ids=["synth-exists", "synth-num", "check-data", "check-tokenizer",
        "check-tokenizer-no-files", "check-tokenizer-broken", "check-template",
        "extract-teacher", "extract-shard-size", "extract-data", "extract-dtype",
        "extract-dtype-teacher", "extract-dtype-value", "verify-not-a-cache"])
def test_bad_arguments_are_reported_without_a_traceback(argv, expected, synth, tmp_path,
                                                        capsys):
    broken = tmp_path / "broken"  # a tokenizer folder whose tokenizer.json is cut short
    broken.mkdir()
    cut = (synth / "tokenizer" / "tokenizer.json").read_text()[:99]
    (broken / "tokenizer.json").write_text(cut)
    names = dict(synth=synth, tmp=tmp_path, broken=broken)
    argv = [a.format(**names) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    expected = expected.format(**names)
    assert err.startswith(f"olavlm {argv[0]} {argv[1]}: ") and expected in err, err


def test_ctrl_c_during_extract_says_how_to_resume(synth, tmp_path, capsys, monkeypatch):
    import olavlm.teachers

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(olavlm.teachers, "extract_targets", interrupted)
    out = tmp_path / "t"
    assert main(["targets", "extract", "--data", str(synth / "train.jsonl"), "--teachers",
                 "synthetic", "--out", str(out)]) == 130
    assert "rerun the same command to resume" in capsys.readouterr().err


def test_a_cache_where_every_image_was_rejected_is_not_ok(synth, tmp_path, capsys):
    """A wrong --image-folder rejects every image: extract and verify both say so (exit 1)
    instead of reporting a cache without targets as done and OK."""
    data = str(synth / "train.jsonl")
    out = tmp_path / "t"
    assert main(["targets", "extract", "--data", data, "--teachers", "synthetic", "--out",
                 str(out), "--image-folder", str(tmp_path / "nowhere"), "--workers", "0"]) == 1
    assert "was rejected: the cache holds no targets" in capsys.readouterr().err
    assert main(["targets", "verify", str(out), "--data", data]) == 1
    printed = capsys.readouterr().out
    assert "none of the dataset's images has targets" in printed and "NOT OK" in printed


def test_check_and_extract_show_their_summary_once(synth, tmp_path, capsys, caplog):
    """`data check` and `targets extract` print their summary (stdout, the command's result);
    the library's own log line of the same summary is dropped while they run, and only then."""
    import logging

    caplog.set_level(logging.INFO)
    data = str(synth / "train.jsonl")
    assert main(["data", "check", data, "--tokenizer", str(synth / "tokenizer"),
                 "--workers", "0"]) == 0
    assert "samples used" in capsys.readouterr().out
    assert main(["targets", "extract", "--data", data, "--teachers", "synthetic", "--out",
                 str(tmp_path / "t"), "--workers", "0"]) == 0
    assert "images in 1 shards" in capsys.readouterr().out
    logged = [r.getMessage() for r in caplog.records]
    assert not [m for m in logged if m.startswith(("data: ", "targets: rank"))], logged
    assert any(m.startswith("targets: shard") for m in logged), logged  # other records pass
    assert not logging.getLogger("olavlm.data").filters
    assert not logging.getLogger("olavlm.teachers").filters


def test_disk_errors_are_one_line_and_a_finished_cache_is_not_rewritten(synth, tmp_path,
                                                                        capsys, monkeypatch):
    """A full disk during extraction: one line, exit 1, how to resume. Rerunning a finished
    extraction writes nothing (it rewrote index.json: a read-only copy failed). --rejects
    naming a folder is refused before the work, not after it."""
    import olavlm.teachers
    import olavlm.teachers.extract as extract_mod

    out = tmp_path / "t"
    argv = ["targets", "extract", "--data", str(synth / "train.jsonl"), "--teachers",
            "synthetic", "--out", str(out), "--workers", "0"]
    assert main(argv) == 0
    capsys.readouterr()

    def no_write(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(extract_mod, "atomic_write", no_write)
    assert main(argv) == 0  # nothing to write
    assert main([*argv[:-3], str(tmp_path / "new"), "--workers", "0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("olavlm targets extract: [Errno 30] Read-only file system") and \
        "rerun the same command to resume" in err
    monkeypatch.undo()
    assert main([*argv, "--rejects", str(tmp_path)]) == 2
    assert "--rejects must be a file, got the directory" in capsys.readouterr().err

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(olavlm.teachers, "extract_targets", full)
    assert main(argv) == 1
    assert "No space left on device" in capsys.readouterr().err
