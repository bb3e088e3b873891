# Image files that are there but cannot be read (permissions, EIO, ESTALE): retried when the
# error is transient, then an unreadable_image reject, never a corrupt_image.
from __future__ import annotations

import errno
import json
import os
import pathlib
import stat

import pytest
import torch
from datahelpers import entry, write_image, write_jsonl

from olavlm.cli import main
from olavlm.data import BadSampleError, ImageView, LlavaDataset, Reject, Sample
from olavlm.data import images as images_module
from olavlm.data.bad_data import REJECT_REASONS


class FlakyReads:
    """Path.read_bytes (or .stat) of the files named ``name`` raises ``errors`` in order, then
    reads normally; with ``forever`` it raises the last one every time after. ``calls``
    counts the attempts on that file."""

    def __init__(self, monkeypatch, name: str, errors, *, forever: bool = False,
                 method: str = "read_bytes"):
        self.calls = 0
        errors = list(errors)
        original = getattr(pathlib.Path, method)

        def patched(path, *args, **kwargs):
            if path.name == name:
                self.calls += 1
                if errors:
                    raise errors[0] if forever and len(errors) == 1 else errors.pop(0)
            return original(path, *args, **kwargs)

        monkeypatch.setattr(pathlib.Path, method, patched)


def _eio(path) -> OSError:
    return OSError(errno.EIO, os.strerror(errno.EIO), str(path))


@pytest.fixture
def no_backoff(monkeypatch):
    monkeypatch.setattr(images_module, "READ_RETRY_DELAY_S", 0.0)


def _dataset(folder, tokenizer, policy="skip"):
    write_image(folder / "img.png", size=(40, 30))
    write_image(folder / "flaky.png", size=(24, 16), colour=(10, 200, 30))
    path = write_jsonl(folder / "d.jsonl", [entry(0), entry(1, image="flaky.png")])
    return LlavaDataset(path, tokenizer, image_view=ImageView(size=8), on_bad_sample=policy)


def test_reason_is_registered():
    assert "unreadable_image" in REJECT_REASONS


def test_a_transient_read_error_is_retried_and_the_sample_loads(tmp_path, llama_tokenizer,
                                                                monkeypatch, no_backoff):
    """EIO once (a disk or NFS hiccup), then the read works: the sample loads, with the
    pixels of the file (not a corrupt_image reject, as before)."""
    ds = _dataset(tmp_path, llama_tokenizer)
    clean = ds[1]
    flaky = FlakyReads(monkeypatch, "flaky.png", [_eio(tmp_path / "flaky.png")])
    sample = ds[1]
    assert isinstance(sample, Sample), sample
    assert flaky.calls == 2
    assert torch.equal(sample.raw_image, clean.raw_image)
    assert sample.raw_image[:, 0, 0].tolist() == [10, 200, 30]
    # ESTALE from the stat that checks it is a file (a stale NFS handle) is retried too.
    stale = OSError(errno.ESTALE, os.strerror(errno.ESTALE), str(tmp_path / "flaky.png"))
    flaky_stat = FlakyReads(monkeypatch, "flaky.png", [stale], method="stat")
    assert isinstance(ds[1], Sample) and flaky_stat.calls >= 2


def test_a_persistent_read_error_is_unreadable_image_after_the_configured_attempts(
        tmp_path, llama_tokenizer, monkeypatch, no_backoff):
    ds = _dataset(tmp_path, llama_tokenizer)
    flaky = FlakyReads(monkeypatch, "flaky.png", [_eio(tmp_path / "flaky.png")], forever=True)
    reject = ds[1]
    assert isinstance(reject, Reject) and reject.reason == "unreadable_image"
    assert flaky.calls == images_module.READ_ATTEMPTS == 3
    assert "EIO" in reject.detail and str(tmp_path / "flaky.png") in reject.detail
    assert isinstance(ds[0], Sample)  # the other image is unaffected
    monkeypatch.setattr(images_module, "READ_ATTEMPTS", 5)  # the module constant decides
    flaky.calls = 0
    assert ds[1].reason == "unreadable_image" and flaky.calls == 5
    with pytest.raises(BadSampleError, match="s1.*unreadable_image.*EIO"):
        _dataset(tmp_path, llama_tokenizer, policy="raise")[1]


def test_retries_back_off_briefly(tmp_path, llama_tokenizer, monkeypatch):
    """The retries wait READ_RETRY_DELAY_S, then twice that: short, bounded backoff."""
    ds = _dataset(tmp_path, llama_tokenizer)
    monkeypatch.setattr(images_module, "READ_RETRY_DELAY_S", 0.01)
    slept = []
    monkeypatch.setattr(images_module.time, "sleep", slept.append)
    FlakyReads(monkeypatch, "flaky.png", [_eio(tmp_path / "flaky.png")], forever=True)
    assert ds[1].reason == "unreadable_image"
    assert slept == [0.01, 0.02]


def test_permission_error_is_unreadable_image_at_once(tmp_path, llama_tokenizer, monkeypatch,
                                                      no_backoff):
    """No permission (chmod 000 does not stop root: the read is patched): not retried (the
    next try fails alike), and not a corrupt_image (the file is fine, its mode is not)."""
    ds = _dataset(tmp_path, llama_tokenizer)
    denied = PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tmp_path / "flaky.png"))
    flaky = FlakyReads(monkeypatch, "flaky.png", [denied], forever=True)
    reject = ds[1]
    assert isinstance(reject, Reject) and reject.reason == "unreadable_image"
    assert flaky.calls == 1
    assert "EACCES" in reject.detail and "flaky.png" in reject.detail
    (tmp_path / "flaky.png").unlink()  # an absent file is still missing_image, not retried
    flaky.calls = 0
    assert ds[1].reason == "missing_image" and flaky.calls == 0


def test_a_truncated_png_stays_corrupt_image(tmp_path, llama_tokenizer):
    ds = _dataset(tmp_path, llama_tokenizer)
    blob = (tmp_path / "flaky.png").read_bytes()
    (tmp_path / "flaky.png").write_bytes(blob[: len(blob) // 2])
    reject = ds[1]
    assert isinstance(reject, Reject) and reject.reason == "corrupt_image"


def test_cli_check_reports_unreadable_images(synth_dir, tmp_path, capsys, monkeypatch,
                                             no_backoff):
    lines = (synth_dir / "val.jsonl").read_text().splitlines()
    first = next(json.loads(x) for x in lines if '"image"' in x)
    name = pathlib.PurePosixPath(first["image"]).name
    FlakyReads(monkeypatch, name, [_eio(synth_dir / first["image"])], forever=True)
    rejects = tmp_path / "rejects.jsonl"
    args = ["data", "check", str(synth_dir / "val.jsonl"), "--tokenizer",
            str(synth_dir / "tokenizer"), "--workers", "0", "--image-size", "32", "--rejects",
            str(rejects)]
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "unreadable_image=1" in out and "corrupt_image" not in out
    assert f"{name}: EIO: " in out
    record = json.loads(rejects.read_text())
    assert record["reason"] == "unreadable_image" and "EIO" in record["detail"]


def test_a_stat_error_reaches_the_retry_where_is_file_swallows_it(tmp_path, llama_tokenizer,
                                                                  monkeypatch, no_backoff):
    """Newer Pythons' Path.is_file returns False for any OSError (3.14: os.path.isfile): the
    file check must stat itself, or an EIO on the stat became missing_image, never retried."""
    ds = _dataset(tmp_path, llama_tokenizer)

    def is_file_swallowing(path):
        try:
            return os.path.isfile(path) and stat.S_ISREG(path.stat().st_mode)
        except OSError:
            return False

    monkeypatch.setattr(pathlib.Path, "is_file", is_file_swallowing)
    flaky = FlakyReads(monkeypatch, "flaky.png", [_eio(tmp_path / "flaky.png")], method="stat")
    assert isinstance(ds[1], Sample) and flaky.calls >= 2
    FlakyReads(monkeypatch, "flaky.png", [_eio(tmp_path / "flaky.png")], method="stat",
               forever=True)
    reject = ds[1]
    assert isinstance(reject, Reject) and reject.reason == "unreadable_image", reject
    assert "EIO" in reject.detail
    (tmp_path / "gone.png").write_bytes(b"")
    (tmp_path / "gone.png").unlink()
    with pytest.raises(FileNotFoundError, match="image file not found"):
        images_module.read_image_file(tmp_path / "gone.png")
