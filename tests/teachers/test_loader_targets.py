# The training loader reads cached targets by image key; missing ones are masked and counted.
from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from transformers import AutoTokenizer

from olavlm.data import BadSampleError, ImageView, LlavaDataset, ResumableLoader
from olavlm.teachers import SyntheticTeacher, TargetCache, extract_targets
from olavlm.teachers.cache import read_json


@pytest.fixture(scope="module")
def setup(teacher_synth_dir, tmp_path_factory):
    """A cache made from the first 16 entries only, and a loader over all 24."""
    root = tmp_path_factory.mktemp("loadercache")
    lines = (teacher_synth_dir / "train.jsonl").read_text().splitlines()
    subset = root / "subset.jsonl"
    subset.write_text("\n".join(lines[:16]) + "\n")
    extract_targets(subset, root / "cache", [SyntheticTeacher()], shard_size=6, num_workers=0,
                    image_folder=teacher_synth_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(teacher_synth_dir / "tokenizer"))
    entries = [json.loads(line) for line in lines]
    return root, tokenizer, entries


def _dataset(folder, tokenizer, cache, **kwargs):
    return LlavaDataset(folder / "train.jsonl", tokenizer, image_view=ImageView(size=32),
                        targets=cache, **kwargs)


def test_targets_by_key_and_masked_misses(setup, teacher_synth_dir, tmp_path, caplog):
    root, tokenizer, entries = setup
    cache = TargetCache(root / "cache")
    dataset = _dataset(teacher_synth_dir, tokenizer, cache)
    loader = ResumableLoader(dataset, batch_size=5, shuffle=False, num_workers=1,
                             rejects_path=tmp_path / "rejects.jsonl")
    batches = list(loader)
    cached = {k for s in read_json(root / "cache" / "index.json")["shards"] for k in s["keys"]}
    uncached = [e["image"] for e in entries[16:] if "image" in e]
    assert uncached and all(k not in cached for k in uncached)
    seen = 0
    for batch in batches:
        assert set(batch.targets) == {"depth", "seg", "gen"}
        assert batch.targets["seg"].shape == (len(batch), 1536, 24, 24)
        for row, key in enumerate(batch.image_keys):
            has = key is not None and key in cached
            assert batch.target_mask[row] == int(has)
            assert batch.image_mask[row] == int(key is not None)
            if has:
                assert torch.equal(batch.targets["depth"][row], cache.read(key)["depth"])
            else:  # masked, and zero only because it is masked
                assert batch.targets["depth"][row].abs().sum() == 0
            seen += 1
    assert seen == len(entries)
    summary = loader.last_summary
    assert f"{len(uncached)} without targets (masked) [missing_target={len(uncached)}]" in summary
    assert summary in caplog.text and any(r.levelno == logging.WARNING for r in caplog.records)
    logged = [json.loads(x) for x in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert sorted(r["sample_id"] for r in logged) == sorted(
        e["id"] for e in entries[16:] if "image" in e)
    assert {r["reason"] for r in logged} == {"missing_target"}
    # The count survives a checkpoint of the loader mid-epoch.
    assert "target_counts" in loader.state_dict()["stats"]


def test_missing_target_can_raise_and_corrupt_rows_are_counted(setup, teacher_synth_dir,
                                                               tmp_path):
    root, tokenizer, entries = setup
    strict = _dataset(teacher_synth_dir, tokenizer, TargetCache(root / "cache"),
                      on_missing_target="raise")
    first_uncached = next(i for i in range(16, len(entries)) if "image" in entries[i])
    strict[0]  # noqa: B018 - a cached one loads
    with pytest.raises(BadSampleError, match="missing_target"):
        strict[first_uncached]
    damaged = tmp_path / "damaged"
    shutil.copytree(root / "cache", damaged)
    shard = read_json(damaged / "index.json")["shards"][0]
    path = damaged / shard["file"]
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # the last row of shard 0
    path.write_bytes(bytes(data))
    dataset = _dataset(teacher_synth_dir, tokenizer, TargetCache(damaged))
    loader = ResumableLoader(dataset, batch_size=8, shuffle=False)
    list(loader)
    assert "corrupt_target=1" in loader.last_summary
    with pytest.raises(ValueError, match="on_missing_target must be one of"):
        _dataset(teacher_synth_dir, tokenizer, None, on_missing_target="zero")
    with pytest.raises(TypeError, match="targets must have"):
        _dataset(teacher_synth_dir, tokenizer, object())


def test_maps_travel_with_the_batch(teacher_synth_dir, setup):
    _, tokenizer, entries = setup
    dataset = LlavaDataset(teacher_synth_dir / "train.jsonl", tokenizer,
                           image_view=ImageView(size=32), keep_maps=True)
    batch = next(iter(ResumableLoader(dataset, batch_size=6, shuffle=False)))
    assert set(batch.maps) == {"depth_mm", "seg_class"} and len(batch.maps["depth_mm"]) == 6
    for row, entry in enumerate(entries[:6]):
        depth = batch.maps["depth_mm"][row]
        assert (depth.max() > 0) == ("image" in entry)  # text-only samples get blank maps


def test_a_missing_map_is_bad_maps_not_a_bad_image(teacher_synth_dir, setup, tmp_path):
    _, tokenizer, entries = setup
    folder = tmp_path / "data"
    shutil.copytree(teacher_synth_dir, folder)
    i = next(k for k, e in enumerate(entries) if "image" in e)
    (folder / entries[i]["depth"]).unlink()
    dataset = LlavaDataset(folder / "train.jsonl", tokenizer, image_view=ImageView(size=32),
                           keep_maps=True)
    reject = dataset[i]
    assert reject.reason == "bad_maps" and "map file not found" in reject.detail
    loader = ResumableLoader(dataset, batch_size=6, shuffle=False)
    list(loader)
    assert "bad_maps=1" in loader.last_summary
