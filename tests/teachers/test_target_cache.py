# The target cache: fp8 error bound, bf16 round trip, corruption caught by verify and reader.
from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch

from olavlm.teachers import (
    FP8_REL_ERROR,
    CorruptTargetError,
    SyntheticTeacher,
    TargetCache,
    dequantize_fp8,
    extract_targets,
    quantize_fp8,
    verify_cache,
)
from olavlm.teachers.cache import FORMAT, key_hash, read_json
from olavlm.teachers.quantize import Fp8ErrorStats, fp8_error_bound


def _realistic_targets(n: int = 6) -> torch.Tensor:
    """Layer-normed-like tokens (unit scale) with a few outliers, a tiny row and a zero row:
    every regime of the fp8 format (normal, subnormal, zero)."""
    torch.manual_seed(0)
    x = torch.nn.functional.layer_norm(torch.randn(n, 64, 96) * 3 + 1, (96,))
    x[:, :, :3] *= 20  # channel outliers, as in ViT features
    x[1, 5] *= 1e-6
    x[2, 7] = 0.0
    return x


def test_fp8_error_is_within_its_stated_bound():
    x = _realistic_targets()
    q, scale = quantize_fp8(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (6, 64)
    back = dequantize_fp8(q, scale)
    err = (back - x).abs()
    assert (err <= fp8_error_bound(x, scale)).all()
    assert torch.equal(back[2, 7], torch.zeros(96))  # a zero row stays exactly zero
    rel_rms = float((back - x).norm() / x.norm())
    assert 0.005 < rel_rms < FP8_REL_ERROR / 2  # ~2-3% in practice, the bound is 6.25%
    stats = Fp8ErrorStats()
    stats.update("depth", x, q, scale)
    reported = stats.as_dict()["depth"]
    assert reported["rel_rms"] == pytest.approx(rel_rms, rel=1e-4)
    assert 0.5 < reported["max_over_bound"] <= 1.0
    # bf16 for comparison: ~2^-9 relative per element.
    bf16 = float((x.bfloat16().float() - x).norm() / x.norm())
    assert bf16 < rel_rms / 5


@pytest.fixture(scope="module")
def synth_cache(teacher_synth_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "bf16"
    report = extract_targets(teacher_synth_dir / "train.jsonl", out, [SyntheticTeacher()],
                             shard_size=5, batch_size=3, num_workers=0)
    assert report.complete and report.num_shards == -(-report.num_images // 5)
    return out


def _maps_for(folder, keys):
    from olavlm.data.synthetic import load_scene_maps

    entries = {json.loads(line).get("image"): json.loads(line)
               for line in (folder / "train.jsonl").read_text().splitlines()}
    loaded = [load_scene_maps(entries[k], folder) for k in keys]
    return {k: [m[k] for m in loaded] for k in ("depth_mm", "seg_class")}


def test_bf16_round_trip_by_key(synth_cache, teacher_synth_dir):
    cache = TargetCache(synth_cache)
    index = read_json(synth_cache / "index.json")
    assert index["format"] == FORMAT and index["storage"] == "bf16"
    keys = [k for shard in index["shards"] for k in shard["keys"]]
    assert len(cache) == len(keys) == index["num_cached"] and keys[0] in cache
    expected = SyntheticTeacher()(maps=_maps_for(teacher_synth_dir, keys))
    for i, key in enumerate(keys):
        got = cache.read(key)
        for task in ("depth", "seg", "gen"):
            assert got[task].dtype == torch.bfloat16
            assert torch.equal(got[task], expected[task][i].bfloat16()), (key, task)
    batch, present, problems = cache.get_batch([keys[3], "images/nope.png", None, keys[0]])
    assert present.tolist() == [True, False, False, True]
    assert [p[:2] for p in problems] == [(1, "missing_target")]
    assert torch.equal(batch["seg"][3], cache.read(keys[0])["seg"])
    assert batch["depth"][1].abs().sum() == 0
    with pytest.raises(KeyError, match="nope"):
        cache.read("images/nope.png")
    only = TargetCache(synth_cache, tasks=["gen"], dtype=torch.float32)
    assert list(only.read(keys[0])) == ["gen"] and only.read(keys[0])["gen"].dtype == torch.float32
    with pytest.raises(ValueError, match="tasks must be among"):
        TargetCache(synth_cache, tasks=["normals"])
    assert cache.sample_bytes() == 2 * (576 * 1024 + 1536 * 576 + 1024) + 3 * 8


def _flip_byte(path, offset_from_end: int) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupted_shard_is_caught_by_verify_and_by_the_reader(synth_cache, tmp_path,
                                                               teacher_synth_dir):
    damaged = tmp_path / "damaged"
    shutil.copytree(synth_cache, damaged)
    assert verify_cache(damaged, data=None).ok
    index = read_json(damaged / "index.json")
    shard = index["shards"][1]
    # The tensors are stored in name order; the last bytes belong to the last row of 'seg'.
    _flip_byte(damaged / shard["file"], offset_from_end=10)
    report = verify_cache(damaged)
    assert not report.ok and report.shards_ok == len(index["shards"]) - 1
    assert any(shard["file"] in p and "SHA-256" in p for p in report.problems)
    # Its images are not counted as cached (training cannot read them), nor as never extracted.
    covered = verify_cache(damaged, data=teacher_synth_dir / "train.jsonl", check_rows=False)
    c = covered.coverage
    assert c["in_damaged_shards"] == len(shard["keys"]) and c["missing_not_rejected"] == 0
    assert c["cached"] == c["dataset_images"] - len(shard["keys"])
    assert covered.num_damaged == len(shard["keys"])
    assert f"{len(shard['keys'])} in damaged shards" in covered.summary()
    cache = TargetCache(damaged)
    with pytest.raises(CorruptTargetError, match="fails its CRC"):
        cache.read(shard["keys"][-1])
    assert cache.lookup(shard["keys"][-1])[1] == "corrupt_target"
    cache.read(shard["keys"][0])  # the other rows of that shard still read
    cache.read(index["shards"][0]["keys"][0])  # and other shards
    # A truncated shard: every one of its rows is reported, without reading garbage.
    other = index["shards"][2]
    path = damaged / other["file"]
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CorruptTargetError, match="truncated"):
        TargetCache(damaged).read(other["keys"][0])
    assert "truncated" in " ".join(verify_cache(damaged, check_rows=False).problems)


def test_verify_reports_coverage_and_unfinished_caches(synth_cache, teacher_synth_dir, tmp_path):
    report = verify_cache(synth_cache, data=teacher_synth_dir / "train.jsonl")
    assert report.ok and report.coverage["missing"] == 0 and report.coverage["extra"] == 0
    assert "OK" in report.summary()
    partial = tmp_path / "partial"
    shutil.copytree(synth_cache, partial)
    (partial / "index.json").unlink()
    unfinished = verify_cache(partial)
    assert not unfinished.ok and "unfinished" in unfinished.summary()
    assert "images cached" not in unfinished.summary()  # not counted without the index
    with pytest.raises(FileNotFoundError, match="not a target cache"):
        verify_cache(tmp_path)
    with pytest.raises(FileNotFoundError, match="no index.json"):
        TargetCache(partial)


def test_key_hash_is_stable():
    # The lookup tables are built from these: they must not depend on the process (PYTHONHASHSEED).
    assert key_hash("images/train-000001.png") == key_hash("images/train-000001.png")
    assert key_hash("a") != key_hash("b") and 0 <= key_hash("a") < 2**64


def _edit_header(path, edit) -> None:
    import struct

    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = edit(raw[8:8 + n].decode())
    assert len(header) == n  # same size: the file size still matches the index
    json.loads(header)  # still JSON: the damage is in what it says
    path.write_bytes(raw[:8] + header.encode() + raw[8 + n:])


@pytest.mark.parametrize("edit", [
    # A per-sample shape digit (the file size and the rows' CRCs are unchanged).
    lambda h: h.replace('"depth":{"dtype":"BF16","shape":[5,576,',
                        '"depth":{"dtype":"BF16","shape":[5,476,', 1),
    # The CRC tensor's end offset: its rows would be 8 bytes and a bit.
    lambda h: re.sub(r'("depth\.crc32":\{[^}]*"data_offsets":\[0,)40\]', r"\g<1>41]", h),
    # Valid JSON of the same length: a tensor's entry that is a string, an offset that is one.
    lambda h: re.sub(r'"gen":\{[^}]*\}', lambda m: '"gen":"' + "x" * (len(m[0]) - 8) + '"', h),
    lambda h: re.sub(r'("depth":\{[^}]*"data_offsets":\[\d+,)(\d+)\]',
                     lambda m: f'{m[1]}"{m[2][:-2]}"]', h),
], ids=["shape", "crc_offsets", "entry_not_object", "offsets_not_ints"])
def test_damaged_header_is_a_corrupt_target_error(synth_cache, tmp_path, edit):
    """Every damaged header raises CorruptTargetError naming the file (before: RuntimeError
    from a reshape, struct.error, TypeError), so training masks it as corrupt_target."""
    damaged = tmp_path / "damaged"
    shutil.copytree(synth_cache, damaged)
    index = read_json(damaged / "index.json")
    shard = damaged / index["shards"][0]["file"]
    before = shard.read_bytes()
    _edit_header(shard, edit)
    assert shard.read_bytes() != before
    key = index["shards"][0]["keys"][0]
    cache = TargetCache(damaged)
    with pytest.raises(CorruptTargetError, match=str(shard)):
        cache.read(key)
    values, problem, detail = cache.lookup(key)
    assert values is None and problem == "corrupt_target" and str(shard) in detail
    report = verify_cache(damaged)
    assert not report.ok and any(str(shard) in p for p in report.problems)
    TargetCache(damaged).read(index["shards"][1]["keys"][0])  # other shards still read


def test_fp8_tiny_and_zero_rows_round_trip_without_nan():
    """A row of tiny values (amax < 448 x 2^-149) had scale amax / 448 = 0, so 0/0 = NaN was
    stored, and the statistics hid it (max(0, NaN) = 0). The scale floor keeps every row
    finite and within its bound; zero rows and zeros in tiny rows read back exactly."""
    x = torch.zeros(2, 4, 8)
    x[0, 0, :4] = torch.tensor([1e-44, 0.0, -3e-45, 0.0])
    x[0, 1] = torch.randn(8) * 1e-38
    x[0, 2] = 1e-42
    x[1, 0] = torch.randn(8)  # a normal row beside them
    q, scale = quantize_fp8(x)
    assert (scale > 0).all() and torch.isfinite(scale).all()
    back = dequantize_fp8(q, scale)
    assert torch.isfinite(back).all()
    assert (back[x == 0] == 0).all() and torch.equal(back[1, 1:], torch.zeros(3, 8))
    assert ((back - x).abs() <= fp8_error_bound(x, scale)).all()
    stats = Fp8ErrorStats()
    stats.update("t", x, q, scale)
    assert stats.as_dict()["t"]["max_over_bound"] <= 1.0
    # A NaN that gets through is reported as over the bound, never as within it.
    stats.update("t", x, q, torch.full_like(scale, float("nan")))
    assert stats.as_dict()["t"]["max_over_bound"] == float("inf")


def test_fp8_bound_holds_when_read_as_bf16(tmp_path):
    """Training reads fp8 targets as bf16: one more rounding, up to 2^-8 of the value. A value
    near both the fp8 and the bf16 worst case exceeded the fp32 bound; the bf16 bound holds,
    for it and for realistic targets, read back through a shard."""
    from olavlm.teachers.cache import ShardFile, encode_shard
    from olavlm.teachers.quantize import to_storage

    # 68.0001 x scale rounds to 72 in fp8 (nearly the worst case, 4 of 4.25), and 72 x scale
    # lies just above a bf16 midpoint, so the bf16 read rounds further away.
    s = (0.25 + 8 * 2**-9 + 2**-10 * 1.0002) / 72
    crafted = torch.tensor([448 * s, 68.0001 * s, 0.0, s]).repeat(64, 24)
    x = torch.cat([crafted[None], _realistic_targets(5)], dim=0)
    stored = to_storage({"t": x}, "fp8_e4m3")
    (tmp_path / "s.safetensors").write_bytes(encode_shard(stored, "fp8_e4m3", list("abcdef")))
    shard = ShardFile(tmp_path / "s.safetensors")
    _, scale = quantize_fp8(x)
    for dtype in (torch.float32, torch.bfloat16):
        got = torch.stack([shard.read_row("t", i, dtype=dtype) for i in range(6)]).float()
        err = (got - x).abs()
        assert (err <= fp8_error_bound(x, scale, dtype=dtype)).all(), dtype
    assert not (err <= fp8_error_bound(x, scale)).all()  # bf16 reads need the extra term
    shard.close()


def test_a_swapped_shard_of_the_same_size_is_not_served(synth_cache, tmp_path):
    """Shards with as many rows and equal key lengths have equal sizes and valid row CRCs: a
    shard file swapped with another (or re-extracted under a running reader) must not serve
    other images' targets under these keys."""
    swapped = tmp_path / "swapped"
    shutil.copytree(synth_cache, swapped)
    index = read_json(swapped / "index.json")
    a, b = index["shards"][0], index["shards"][1]
    assert a["bytes"] == b["bytes"]  # the premise: indistinguishable by size
    pa, pb = swapped / a["file"], swapped / b["file"]
    da, db = pa.read_bytes(), pb.read_bytes()
    pa.write_bytes(db)
    pb.write_bytes(da)
    cache = TargetCache(swapped)
    targets, reason, detail = cache.lookup(a["keys"][0])
    assert targets is None and reason == "corrupt_target"
    assert "other images than index.json lists" in detail
    assert TargetCache(synth_cache).lookup(a["keys"][0])[1] is None  # intact: served


def test_an_io_error_is_a_corrupt_target_not_a_crash(synth_cache, monkeypatch):
    """An I/O error opening or reading a shard (EIO on network storage, a permission) marks
    the sample corrupt_target; the loader goes on."""
    import olavlm.teachers.cache as cache_mod

    index = read_json(synth_cache / "index.json")
    key = index["shards"][0]["keys"][0]
    real_pread = os.pread

    header_bytes = int.from_bytes((synth_cache / index["shards"][0]["file"]).read_bytes()[:8],
                                  "little")
    failing = {"at": None}

    def failing_pread(fd, n, offset):
        if failing["at"] == "row" and offset >= 8 + header_bytes:  # a row, not the header
            raise OSError(5, "Input/output error")
        if failing["at"] == "header" and offset == 8:
            raise OSError(5, "Input/output error")
        return real_pread(fd, n, offset)

    monkeypatch.setattr(cache_mod.os, "pread", failing_pread)
    cache = TargetCache(synth_cache)
    failing["at"] = "row"
    targets, reason, detail = cache.lookup(key)
    assert targets is None and reason == "corrupt_target"
    assert "cannot read row" in detail and "Input/output error" in detail
    failing["at"] = None
    assert cache.lookup(key)[1] is None  # the next read succeeds
    fresh = TargetCache(synth_cache)
    failing["at"] = "header"
    fds = len(os.listdir("/proc/self/fd"))
    for _ in range(20):  # opening the shard fails: reported, not remembered, nothing leaked
        targets, reason, detail = fresh.lookup(key)
        assert reason == "corrupt_target" and "cannot read" in detail
    assert len(os.listdir("/proc/self/fd")) == fds
    failing["at"] = None
    assert fresh.lookup(key)[1] is None

    def no_open(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cache_mod.os, "open", no_open)
    assert TargetCache(synth_cache).lookup(key)[1] == "corrupt_target"


def test_a_damaged_index_names_its_file(synth_cache, tmp_path):
    damaged = tmp_path / "damaged-index"
    shutil.copytree(synth_cache, damaged)
    (damaged / "index.json").write_text((synth_cache / "index.json").read_text()[:100])
    with pytest.raises(ValueError, match=r"index.json: damaged, not valid JSON"):
        TargetCache(damaged)


def test_verify_says_how_to_redo_a_damaged_shard(teacher_synth_dir, tmp_path):
    """A flipped byte keeps the shard's size, so a resumed extract took it as done: verify
    names the sidecars to delete, and the rerun then redoes exactly those shards."""
    data = teacher_synth_dir / "train.jsonl"
    out = tmp_path / "c"
    kwargs = dict(shard_size=5, batch_size=3, num_workers=0)
    extract_targets(data, out, [SyntheticTeacher()], **kwargs)
    shard = read_json(out / "index.json")["shards"][1]
    _flip_byte(out / shard["file"], offset_from_end=10)
    report = verify_cache(out)
    sidecar = shard["file"].removesuffix(".safetensors") + ".json"
    assert not report.ok and any(f"delete their sidecars ({sidecar})" in p
                                 for p in report.problems)
    (out / sidecar).unlink()
    again = extract_targets(data, out, [SyntheticTeacher()], **kwargs)
    assert again.shards_written == [1] and verify_cache(out).ok


def test_verify_images_with_a_wrong_folder_is_not_ok(synth_cache, teacher_synth_dir, tmp_path):
    report = verify_cache(synth_cache, data=teacher_synth_dir / "train.jsonl",
                          check_images=True, image_folder=tmp_path / "nowhere")
    assert report.coverage["images_checked"] == 0 and report.coverage["unreadable"] > 0
    assert not report.ok and "none of the" in report.summary()
    assert verify_cache(synth_cache, data=teacher_synth_dir / "train.jsonl",
                        check_images=True).ok
