# A target computed from an image that changed after extraction is caught, not trained on.
from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image, ImageOps
from transformers import AutoTokenizer

from olavlm.cli import main as olavlm_main
from olavlm.data import BadSampleError, ImageView, LlavaDataset, ResumableLoader, image_digest
from olavlm.teachers import SyntheticTeacher, TargetCache, extract_targets, verify_cache
from olavlm.teachers.cache import read_json


@pytest.fixture()
def changed(teacher_synth_dir, tmp_path):
    """(data folder, cache, the key of one image rewritten after extraction)."""
    folder = tmp_path / "data"
    shutil.copytree(teacher_synth_dir, folder)
    cache = tmp_path / "cache"
    extract_targets(folder / "train.jsonl", cache, [SyntheticTeacher()], shard_size=7,
                    num_workers=0)
    entries = [json.loads(x) for x in (folder / "train.jsonl").read_text().splitlines()]
    key = next(e["image"] for e in entries[3:] if "image" in e)
    with Image.open(folder / key) as image:
        ImageOps.invert(image.convert("RGB")).save(folder / key)
    return folder, cache, key


def _dataset(folder, cache, **kwargs):
    tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
    return LlavaDataset(folder / "train.jsonl", tokenizer, image_view=ImageView(size=32),
                        targets=TargetCache(cache), **kwargs)


def test_extraction_records_each_image_files_digest(changed, teacher_synth_dir):
    folder, cache, _ = changed
    index = read_json(cache / "index.json")
    pairs = [(k, d) for s in index["shards"] for k, d in zip(s["keys"], s["image_digests"],
                                                              strict=True)]
    assert pairs
    reader = TargetCache(cache)
    for key, digest in pairs:  # the digests of the files as they were (the original folder)
        assert digest == image_digest((teacher_synth_dir / key).read_bytes())
        assert reader.image_digest(key) == digest
    assert reader.checks_image_digest and reader.image_digest("images/absent.png") is None


def test_a_changed_image_is_masked_as_stale_or_raises(changed, tmp_path):
    folder, cache, key = changed
    dataset = _dataset(folder, cache)
    loader = ResumableLoader(dataset, batch_size=6, shuffle=False,
                             rejects_path=tmp_path / "rejects.jsonl")
    rows = [(k, int(m)) for batch in loader for k, m in zip(batch.image_keys, batch.target_mask,
                                                           strict=True) if k is not None]
    assert dict(rows)[key] == 0  # not trained towards the old image's targets
    assert all(m == 1 for k, m in rows if k != key)
    assert "stale_target=1" in loader.last_summary
    logged = [json.loads(x) for x in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert [r["reason"] for r in logged] == ["stale_target"]
    assert key in logged[0]["detail"] and "targets extract" in logged[0]["detail"]
    strict = _dataset(folder, cache, on_missing_target="raise")
    position = next(i for i in range(len(strict)) if strict.index.entry(i).get("image") == key)
    with pytest.raises(BadSampleError, match="stale_target"):
        strict[position]


def test_verify_images_reports_stale_targets(changed, capsys):
    folder, cache, key = changed
    assert verify_cache(cache, data=folder / "train.jsonl").ok  # files are not read by default
    report = verify_cache(cache, data=folder / "train.jsonl", check_images=True)
    assert not report.ok
    assert report.coverage["stale"] == 1 and report.coverage["stale_examples"] == [key]
    assert report.coverage["images_checked"] == report.coverage["cached"]
    assert "PROBLEM: stale targets" in report.summary()
    assert olavlm_main(["targets", "verify", str(cache), "--data", str(folder / "train.jsonl"),
                        "--images"]) == 1
    assert "1 changed since extraction" in capsys.readouterr().out
    assert olavlm_main(["targets", "verify", str(cache), "--images"]) == 2
    assert "--images needs --data" in capsys.readouterr().err
    with pytest.raises(ValueError, match="check_images=True needs data"):
        verify_cache(cache, check_images=True)


def test_a_cache_without_digests_still_reads(changed):
    # Caches extracted before digests were recorded: no check, and nothing refused.
    folder, cache, key = changed
    index = read_json(cache / "index.json")
    for shard in index["shards"]:
        del shard["image_digests"]
    (cache / "index.json").write_text(json.dumps(index))
    reader = TargetCache(cache)
    assert not reader.checks_image_digest and reader.image_digest(key) is None
    dataset = _dataset(folder, cache)
    position = next(i for i in range(len(dataset)) if dataset.index.entry(i).get("image") == key)
    assert dataset[position].target_present
    report = verify_cache(cache, data=folder / "train.jsonl", check_images=True)
    assert report.ok and report.coverage["no_digest"] == report.coverage["cached"]
    index["shards"][0]["image_digests"] = ["00ff"]  # fewer digests than keys: a damaged index
    (cache / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="image digests"):
        TargetCache(cache)
    assert any("image digests" in p for p in verify_cache(cache).problems)
