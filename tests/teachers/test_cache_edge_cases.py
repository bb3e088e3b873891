# The target cache at its edges: teacher outputs NaN/inf/huge/zero, fp8 error against float64,
# a write failing half way at each file, ranks by argument, duplicate and unusual image keys.
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from olavlm.data import image_key
from olavlm.teachers import TargetCache, extract_targets, verify_cache
from olavlm.teachers import cache as cache_module
from olavlm.teachers.base import Teacher
from olavlm.teachers.cache import ShardFile, read_json

BF16_MAX = torch.finfo(torch.bfloat16).max
# Image colour (its red level) -> what the teacher does to that image's targets.
SPECIAL = {50: "nan", 60: "zero", 70: "huge", 80: "inf", 90: "beyond_bf16", 100: "bf16_max"}


class PixelTeacher(Teacher):
    """A tiny image teacher whose targets depend on the image's mean colour; images of the
    colours in ``SPECIAL`` get NaN, zeros, huge or out-of-range values."""

    name = "pixel"
    tasks = ("depth", "gen")

    def __init__(self):
        super().__init__(device="cpu", dtype=torch.float32, seed_compat=False)
        self._freeze()

    def target_shapes(self):
        return {"depth": (4, 8), "gen": (1, 8)}

    def preprocess(self, images, maps=None):
        return torch.stack([im.float().mean(dim=(1, 2)) for im in images])

    def encode(self, x):
        n = x.shape[0]
        depth = x[:, :1, None] / 255 + torch.arange(32.0).view(1, 4, 8) / 7 - 2
        depth = depth.expand(n, 4, 8).clone()
        for level, kind in SPECIAL.items():
            rows = x[:, 0] == level
            if kind == "nan":
                depth[rows, 1, 3] = float("nan")
            elif kind == "zero":
                depth[rows] = 0.0
            elif kind == "huge":
                depth[rows] *= 1e30
            elif kind == "inf":
                depth[rows, 0, 0] = float("inf")
            elif kind == "beyond_bf16":  # finite in fp32, inf once stored or read as bf16
                depth[rows, 2, 1] = 3.4e38
            elif kind == "bf16_max":
                depth[rows, 2, 1] = BF16_MAX
        return {"depth": depth, "gen": depth[:, :1] * 2}


NAMES = ["a.png", "sub dir/ü ñ 日本.png", "x y/z w.png", "plain/b.png", "./a.png", "plain//b.png",
         "c.png", "d.png", "e.png", "f.png", "g.png", "h.png", "i.png"]
LEVELS = [10, 20, 30, 40, 10, 40, 50, 60, 70, 80, 90, 100, 110]


def _conv():
    return [{"from": "human", "value": "<image>\nwhat is it?"}, {"from": "gpt", "value": "ok"}]


@pytest.fixture(scope="module")
def pixel_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pixdata")
    lines = []
    for name, level in zip(NAMES, LEVELS, strict=True):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), level, np.uint8)).save(path)
        lines.append(json.dumps({"id": name, "image": name, "conversations": _conv()},
                                ensure_ascii=False))
    lines.append(json.dumps({"id": "text", "conversations": _conv()}))  # text-only
    (root / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root / "train.jsonl"


def _extract(data, out, **kwargs):
    kwargs = {"shard_size": 3, "batch_size": 2, "num_workers": 0} | kwargs
    return extract_targets(data, out, [PixelTeacher()], **kwargs)


def _image(data: Path, key: str) -> torch.Tensor:
    arr = np.array(Image.open(data.parent / key).convert("RGB"))
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())
            if p.is_file() and p.name != ".extract.lock"}


@pytest.mark.parametrize("storage", ["bf16", "fp8_e4m3"])
def test_nonfinite_and_out_of_range_targets_are_rejected_never_stored(pixel_data, tmp_path,
                                                                      storage):
    """NaN and inf rows are rejected; so is a finite fp32 value above bf16's largest (3.4e38),
    which was stored as inf (bf16) or read back as inf (fp8 read as bf16, training's read).
    Zero rows, 1e30 rows and exactly bf16's largest value are kept and read back finite."""
    out = tmp_path / storage
    report = _extract(pixel_data, out, storage=storage)
    assert report.complete
    index = read_json(out / "index.json")
    rejected = {r["sample_id"]: r["reason"] for r in index["rejects"]}
    assert rejected == {"c.png": "nonfinite_target", "f.png": "nonfinite_target",
                        "g.png": "nonfinite_target"}
    cache = TargetCache(out)  # bf16, as training reads
    teacher = PixelTeacher()
    for key in {image_key(n) for n in NAMES} - set(rejected):
        got = cache.read(key)
        want = teacher([_image(pixel_data, key)])
        for task, value in got.items():
            assert torch.isfinite(value).all(), (key, task)
            x = want[task][0].double()
            # An independent tolerance: bf16's relative rounding, or fp8's 2^-4 plus bf16's.
            rel = 2.0**-8 if storage == "bf16" else 2.0**-4 + 2.0**-8 * (1 + 2.0**-4)
            tol = rel * x.abs() + 2.0**-10 * x.abs().amax(dim=-1, keepdim=True) * (
                storage != "bf16")
            assert ((value.double() - x).abs() <= tol * (1 + 1e-6)).all(), (key, task)
    assert torch.equal(cache.read("d.png")["depth"], torch.zeros(4, 8, dtype=torch.bfloat16))
    assert float(cache.read("h.png")["depth"].float().abs().max()) == BF16_MAX
    assert verify_cache(out, data=pixel_data).ok  # rejected images do not fail verify


def test_fp8_error_report_matches_a_float64_computation(pixel_data, tmp_path):
    """The index's relative RMS error (what extract and verify print) equals one computed in
    float64 from the teacher's outputs and the fp32 reads of the stored fp8 values."""
    out = tmp_path / "fp8"
    report = _extract(pixel_data, out, storage="fp8_e4m3")
    index = read_json(out / "index.json")
    teacher = PixelTeacher()
    err2, x2 = {}, {}
    for shard in index["shards"]:
        f = ShardFile(out / shard["file"])
        for row, key in enumerate(shard["keys"]):
            for task, x in teacher([_image(pixel_data, key)]).items():
                x = x[0].double().reshape(x.shape[1], -1)
                q = torch.frombuffer(bytearray(f.row_bytes(task, row)),
                                     dtype=torch.float8_e4m3fn).float().reshape(x.shape)
                scale = torch.frombuffer(bytearray(f.row_bytes(f"{task}.scale", row)),
                                         dtype=torch.float32)
                read = (q * scale[:, None]).double()  # what an fp32 read returns
                err2[task] = err2.get(task, 0.0) + float((read - x).square().sum())
                x2[task] = x2.get(task, 0.0) + float(x.square().sum())
        f.close()
    for task in ("depth", "gen"):
        expected = math.sqrt(err2[task] / x2[task])
        assert index["fp8_error"][task]["rel_rms"] == pytest.approx(expected, rel=1e-5)
        assert report.fp8_error[task]["rel_rms"] == pytest.approx(expected, rel=1e-5)
        assert 0.0 < index["fp8_error"][task]["max_over_bound"] <= 1.0
    assert verify_cache(out).fp8_error["depth"]["rel_rms"] == index["fp8_error"]["depth"][
        "rel_rms"]


@pytest.mark.parametrize("file", ["shard-00001.safetensors", "shard-00001.json",
                                  "shard-00002.safetensors", "index.json", "plan.json"])
def test_a_write_failing_half_way_resumes_to_the_uninterrupted_cache(pixel_data, tmp_path,
                                                                      monkeypatch, file):
    """An error (disk full) half way through writing each kind of file: no reader accepts the
    unfinished cache, the rerun redoes only unfinished shards, and the result is byte-identical
    to an uninterrupted extraction."""
    whole = tmp_path / "whole"
    _extract(pixel_data, whole)
    out = tmp_path / "cut"
    write_all = cache_module._write_all

    def failing(f, data):
        if os.path.basename(f.name).startswith(f".{file}.tmp-"):
            f.write(data[: len(data) // 2])
            f.flush()
            raise OSError(28, "No space left on device")
        write_all(f, data)

    monkeypatch.setattr(cache_module, "_write_all", failing)
    with pytest.raises(OSError, match="No space"):
        _extract(pixel_data, out)
    monkeypatch.setattr(cache_module, "_write_all", write_all)
    assert not (out / file).exists()  # only the temporary holds the partial bytes
    with pytest.raises(FileNotFoundError):
        TargetCache(out)
    if file != "plan.json":
        assert not verify_cache(out).ok
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.safetensors")
                if (out / p.name.replace(".safetensors", ".json")).exists()}
    report = _extract(pixel_data, out)
    assert report.complete
    assert sorted(report.shards_skipped) == sorted(int(n[6:11]) for n in finished)
    assert {n: (out / n).stat().st_mtime_ns for n in finished} == finished  # not redone
    assert _files(out) == _files(whole)  # no temporary left, every byte as uninterrupted


@pytest.mark.parametrize("world_size", [2, 3, 7])
def test_ranks_given_by_argument_cover_every_image_once(pixel_data, tmp_path, world_size):
    """Without a process group, ranks given as arguments (run one after the other, in any
    order) write disjoint shards; the last one writes the index; every image once."""
    single = tmp_path / "single"
    _extract(pixel_data, single)
    shards = lambda d: {n: b for n, b in _files(d).items() if n.endswith(".safetensors")}
    for j, order in enumerate((range(world_size), reversed(range(world_size)))):
        out = tmp_path / f"order{j}"
        order = list(order)
        reports = [_extract(pixel_data, out, rank=r, world_size=world_size) for r in order]
        # Complete (index written) once every rank that owns a shard has run.
        owners = {k % world_size for k in range(reports[0].num_shards)}
        assert [r.complete for r in reports] == [owners <= set(order[:i + 1])
                                                 for i in range(world_size)]
        written = [k for r in reports for k in r.shards_written]
        assert sorted(written) == list(range(reports[0].num_shards))
        index = read_json(out / "index.json")
        keys = [k for s in index["shards"] for k in s["keys"]]
        rejected = [r["sample_id"] for r in index["rejects"]]
        assert len(keys + rejected) == len(set(keys + rejected))
        assert set(keys + rejected) == {image_key(n) for n in NAMES}
        assert shards(out) == shards(single)  # the shards do not depend on the ranks


def test_duplicate_and_unusual_image_keys(pixel_data, tmp_path):
    """Spaces, non-ASCII characters and subfolders in keys; './a.png' and 'a.png' (and
    'plain//b.png' and 'plain/b.png') are one image, computed once; the loader's key finds
    it; verify's coverage counts distinct images."""
    out = tmp_path / "keys"
    report = _extract(pixel_data, out)
    distinct = {image_key(n) for n in NAMES}
    assert report.num_images == len(distinct) == len(NAMES) - 2
    cache = TargetCache(out)
    for name in NAMES:
        if image_key(name) not in ("c.png", "f.png", "g.png"):
            assert image_key(name) in cache, name
    assert "sub dir/ü ñ 日本.png" in cache and "x y/z w.png" in cache
    a, b = cache.read("./a.png".removeprefix("./")), cache.read(image_key("./a.png"))
    assert all(torch.equal(a[t], b[t]) for t in a)
    coverage = verify_cache(out, data=pixel_data, check_images=True).coverage
    assert coverage["dataset_images"] == len(distinct) and coverage["extra"] == 0
    assert coverage["cached"] == len(distinct) - 3
    assert coverage["rejected"] == {"nonfinite_target": 3}
    assert coverage["missing_not_rejected"] == 0 and coverage["stale"] == 0
    assert coverage["images_checked"] == len(distinct) - 3


def test_an_overwrite_interrupted_while_clearing_leaves_no_cache_a_reader_accepts(
        pixel_data, tmp_path, monkeypatch):
    """--overwrite deletes the old cache's index before its shards: stopped part way (a kill,
    a permission error), the folder is refused as unfinished, never read as a cache whose
    index names deleted shards."""
    from olavlm.teachers import extract as extract_module

    out = tmp_path / "c"
    _extract(pixel_data, out)
    unlink = Path.unlink
    calls = []

    def stopping_unlink(path, *args, **kwargs):
        calls.append(path.name)
        if len(calls) == 2:  # the second file cleared
            raise PermissionError(13, "Permission denied", str(path))
        return unlink(path, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", stopping_unlink)
    with pytest.raises(PermissionError):
        extract_module._clear_cache_files(out)
    monkeypatch.setattr(Path, "unlink", unlink)
    with pytest.raises(FileNotFoundError):
        TargetCache(out)
    assert not verify_cache(out).ok
    assert _extract(pixel_data, out, overwrite=True).complete
    assert len(TargetCache(out)) > 0
