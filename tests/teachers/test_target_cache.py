# The target cache: fp8 error bound, bf16 round trip, corruption caught by verify and reader.
from __future__ import annotations

import json
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
