# Target extraction over images that cannot be read (permissions, EIO) or that PIL's decoders
# refuse with exotic exceptions: counted rejects, retried reads, and what a rerun does.
from __future__ import annotations

import errno
import io
import json
import os
import pathlib
import struct

import numpy as np
import pytest
from PIL import Image

from olavlm.data import BadSampleError
from olavlm.data import images as images_module
from olavlm.teachers import build_teachers, extract_targets


def _write_data(folder: pathlib.Path, names) -> pathlib.Path:
    (folder / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in names:
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8)).save(folder / "images" / name)
    conv = [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "ok"}]
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps({"id": n, "image": f"images/{n}", "conversations": conv})
                            + "\n" for n in names))
    return data


_READ_BYTES = pathlib.Path.read_bytes


def _fail_reads(monkeypatch, failures: dict[str, list]) -> dict[str, int]:
    """Path.read_bytes of a file named in ``failures`` raises its errors in order, the last
    one for ever (None: a read that works); returns the attempts per name."""
    calls = dict.fromkeys(failures, 0)

    def read_bytes(path):
        if path.name not in failures:
            return _READ_BYTES(path)
        calls[path.name] += 1
        errors = failures[path.name]
        err = errors.pop(0) if len(errors) > 1 else errors[0]
        if err is None:
            return _READ_BYTES(path)
        raise err

    monkeypatch.setattr(pathlib.Path, "read_bytes", read_bytes)
    return calls


def _cache(folder: pathlib.Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())
            if p.name.startswith("shard-") and p.name.endswith(".safetensors")}


@pytest.fixture
def gen(tiny_weights):
    return build_teachers("gen", f"gen={tiny_weights['gen']}")


def test_unreadable_images_are_rejected_and_read_again_on_the_next_run(gen, tmp_path,
                                                                        monkeypatch):
    """A transient EIO is retried and the image cached; a PermissionError is an
    unreadable_image (not a corrupt_image: the file is fine) at once; a rerun while it still
    cannot be read redoes nothing, and once it reads (permissions fixed: no mtime changes) the
    rerun fills the cache, byte for byte as an extraction that never failed."""
    monkeypatch.setattr(images_module, "READ_RETRY_DELAY_S", 0.0)
    names = ["ok.png", "flaky.png", "locked.png"]
    data = _write_data(tmp_path / "d", names)
    kwargs = dict(num_workers=0, shard_size=4)
    clean = extract_targets(data, tmp_path / "clean", gen, **kwargs)
    assert clean.complete and clean.num_cached == 3

    images = tmp_path / "d" / "images"
    eio = OSError(errno.EIO, os.strerror(errno.EIO), str(images / "flaky.png"))
    denied = PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(images / "locked.png"))
    calls = _fail_reads(monkeypatch, {"flaky.png": [eio, None], "locked.png": [denied]})
    first = extract_targets(data, tmp_path / "c", gen, rejects_path=tmp_path / "r.jsonl",
                            **kwargs)
    assert first.complete and first.num_cached == 2
    assert first.rejects == {"unreadable_image": 1}
    assert calls == {"flaky.png": 2, "locked.png": 1}  # EIO retried; EACCES not
    reject = json.loads((tmp_path / "r.jsonl").read_text())
    assert reject["reason"] == "unreadable_image" and reject["sample_id"] == "images/locked.png"
    assert reject["detail"].startswith(f"{images / 'locked.png'}: EACCES: ")

    still = extract_targets(data, tmp_path / "c", gen, **kwargs)
    assert still.shards_written == [] and still.cache_rejects == {"unreadable_image": 1}

    monkeypatch.setattr(pathlib.Path, "read_bytes", _READ_BYTES)  # readable now
    fixed = extract_targets(data, tmp_path / "c", gen, **kwargs)
    assert fixed.shards_written == [0] and fixed.num_cached == 3 and fixed.cache_rejects == {}
    assert _cache(tmp_path / "c") == _cache(tmp_path / "clean")



def test_a_persistent_eio_is_unreadable_after_the_configured_attempts(gen, tmp_path,
                                                                       monkeypatch):
    monkeypatch.setattr(images_module, "READ_RETRY_DELAY_S", 0.0)
    data = _write_data(tmp_path / "d", ["ok.png", "bad.png"])
    eio = OSError(errno.EIO, os.strerror(errno.EIO))  # (a failing read() names no file)
    calls = _fail_reads(monkeypatch, {"bad.png": [eio]})
    report = extract_targets(data, tmp_path / "c", gen, num_workers=0, shard_size=4,
                             rejects_path=tmp_path / "r.jsonl")
    assert report.rejects == {"unreadable_image": 1} and report.num_cached == 1
    assert calls == {"bad.png": images_module.READ_ATTEMPTS}
    detail = json.loads((tmp_path / "r.jsonl").read_text())["detail"]
    assert "EIO" in detail and "bad.png" in detail
    with pytest.raises(BadSampleError, match="unreadable_image.*EIO"):
        extract_targets(data, tmp_path / "c2", gen, num_workers=0, shard_size=4,
                        on_bad_sample="raise")


def test_a_png_with_a_damaged_chunk_is_a_corrupt_image_not_a_crash(gen, tmp_path):
    """PIL raises SyntaxError for a damaged PNG chunk: training counts it as corrupt_image
    (tests/data/test_llava.py); extraction crashed on it (its branch caught OSError only)."""
    data = _write_data(tmp_path / "d", ["ok.png"])
    pixels = Image.fromarray(np.random.default_rng(1).integers(0, 255, (24, 40, 3), np.uint8))
    png = io.BytesIO()
    pixels.save(png, "PNG")
    png = bytearray(png.getvalue())
    at = png.index(b"IDAT") - 4
    png[at:at + 4] = struct.pack(">I", 15)  # IDAT claims 15 bytes: the next "chunk" is garbage
    (tmp_path / "d/images/broken.png").write_bytes(bytes(png))
    conv = [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "ok"}]
    with data.open("a") as f:
        f.write(json.dumps({"id": "b", "image": "images/broken.png", "conversations": conv})
                + "\n")
    report = extract_targets(data, tmp_path / "c", gen, num_workers=0, shard_size=4,
                             rejects_path=tmp_path / "r.jsonl")
    assert report.complete and report.num_cached == 1
    assert report.rejects == {"corrupt_image": 1}
    assert "broken.png: SyntaxError: broken PNG file" in (tmp_path / "r.jsonl").read_text()
