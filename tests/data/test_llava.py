# Reading LLaVA json/jsonl, samples and their views, and every bad-data case of the issue.
from __future__ import annotations

import io
import json
import logging
import struct

import numpy as np
import pytest
import torch
from datahelpers import entry, write_image, write_jsonl
from PIL import Image

from olavlm.data import (
    IMAGE_TOKEN_INDEX,
    BadSampleError,
    ImageView,
    LlavaDataset,
    LlavaIndex,
    Reject,
    ResumableLoader,
    Sample,
)


@pytest.fixture
def folder(tmp_path):
    write_image(tmp_path / "img.png", size=(40, 30))
    write_image(tmp_path / "wide.jpg", size=(80, 20), colour=(0, 0, 200), fmt="JPEG")
    return tmp_path


def test_jsonl_index_keeps_offsets_not_entries(folder):
    path = write_jsonl(folder / "d.jsonl", [entry(0), "", entry(1, image=None), entry(2)])
    index = LlavaIndex(path)
    assert len(index) == 3 and index.rejects == []
    assert index._buffers == [None]  # nothing parsed is kept: entries are re-read from disk
    assert index.entry(1) == entry(1, image=None)
    assert index.location(2) == f"{path}:4"  # the blank line 2 is not a sample
    words = len("question 0 0? answer 0 0.".split())
    # LLaVA's signed word counts ("<image>" counts as a word there too).
    assert index.modality_lengths.tolist() == [words + 1, -words, words + 1]
    with pytest.raises(IndexError):
        index.entry(3)


def test_json_list_reads_like_jsonl(folder):
    entries = [entry(i) for i in range(3)] + [entry(3, image=None)]
    (folder / "d.json").write_text(json.dumps(entries))
    write_jsonl(folder / "d.jsonl", entries)
    a, b = LlavaIndex(folder / "d.json"), LlavaIndex(folder / "d.jsonl")
    assert [a.entry(i) for i in range(4)] == [b.entry(i) for i in range(4)] == entries
    assert a.location(1) == f"{folder / 'd.json'}[#1]"
    both = LlavaIndex([folder / "d.json", folder / "d.jsonl"])
    assert len(both) == 8 and both.entry(5) == entries[1]


def test_sample_fields(folder, llama_tokenizer):
    write_jsonl(folder / "d.jsonl", [entry(0), entry(1, image=None), entry(2, image="wide.jpg")])
    teacher = {"depth": ImageView(size=12, aspect="stretch", mean=None, std=None)}
    ds = LlavaDataset(folder / "d.jsonl", llama_tokenizer, image_view=ImageView(size=16),
                      teacher_views=teacher)
    s = ds[0]
    assert isinstance(s, Sample) and s.sample_id == "s0" and s.has_image and not s.truncated
    assert s.input_ids.tolist().count(IMAGE_TOKEN_INDEX) == 1
    assert s.image.shape == (3, 16, 16) and s.image.dtype == torch.float32
    assert s.raw_image.shape == (3, 30, 40) and s.raw_image.dtype == torch.uint8
    assert s.raw_image[:, 0, 0].tolist() == [200, 30, 30]  # decoded once, kept as is
    assert s.teacher_views["depth"].shape == (3, 12, 12)
    text = ds[1]
    assert not text.has_image and IMAGE_TOKEN_INDEX not in text.input_ids.tolist()
    assert text.image.abs().sum() == 0 and text.raw_image.shape == (3, 16, 16)
    assert text.raw_image.sum() == 0 and text.teacher_views["depth"].sum() == 0
    assert ds[2].raw_image.shape == (3, 20, 80)


def test_arguments_are_checked(folder, llama_tokenizer):
    path = write_jsonl(folder / "d.jsonl", [entry(0)])
    with pytest.raises(ValueError, match="on_bad_sample must be one of"):
        LlavaDataset(path, llama_tokenizer, on_bad_sample="ignore")
    with pytest.raises(ValueError, match="max_length must be an int >= 2, got 0"):
        LlavaDataset(path, llama_tokenizer, max_length=0)
    with pytest.raises(ValueError, match="data_path must be existing"):
        LlavaDataset(folder / "d.csv", llama_tokenizer)
    with pytest.raises(TypeError, match="image_view must be an ImageView"):
        LlavaDataset(path, llama_tokenizer, image_view=336)


def test_a_template_whose_special_tokens_the_tokenizer_splits_is_refused(folder,
                                                                         llama_tokenizer,
                                                                         phi_tokenizer):
    """A Phi-3 tokenizer with llava_llama_3 (the default template) tokenized the chat markup
    as text and trained on silently wrong labels ("\nred<|eot_id|><|start_header_id|>user...")."""
    path = write_jsonl(folder / "d.jsonl", [entry(0)])
    # (this BPE learned "<|start_header_id|>" whole from the corpus; the other two it splits)
    with pytest.raises(ValueError, match=r"template 'llava_llama_3' needs the special tokens "
                       r"\['<\|end_header_id\|>', '<\|eot_id\|>'\] as single tokens"):
        LlavaDataset(path, phi_tokenizer)
    assert len(LlavaDataset(path, phi_tokenizer, template="llava_phi_3")) == 1
    assert len(LlavaDataset(path, phi_tokenizer, template="plain")) == 1  # (no special tokens)
    assert len(LlavaDataset(path, llama_tokenizer, template="llava_phi_3")) == 1  # (has both)


# --- bad data ---------------------------------------------------------------------------------

BAD_LINES = {
    "malformed_json": '{"id": "broken", "conversations": [',
    "no_conversations": json.dumps({"id": "empty", "image": "img.png"}),
    "bad_entry": json.dumps({"id": "roles", "conversations": [
        {"from": "human", "value": "a"}, {"from": "human", "value": "b"}]}),
}
# Valid JSON that no tokenizer takes or that crashed indexing: bad entries, counted.
ODD_ENTRIES = {
    "lone_surrogate": '{"id": "s", "conversations": [{"from": "human", "value": "hi \\ud83d"}, '
                      '{"from": "gpt", "value": "ok"}]}',
    "surrogate_image": '{"id": "i", "image": "a\\ud83d.png", "conversations": '
                       '[{"from": "human", "value": "hi"}, {"from": "gpt", "value": "ok"}]}',
    "list_role": json.dumps({"id": "l", "conversations": [
        {"from": ["human"], "value": "a"}, {"from": "gpt", "value": "b"}]}),
}


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
@pytest.mark.parametrize("case", sorted(ODD_ENTRIES))
def test_odd_entries_are_counted_bad_entries(folder, llama_tokenizer, case, suffix):
    line = ODD_ENTRIES[case]
    assert json.loads(line)  # valid JSON: the index must judge it, not crash on it
    if suffix == ".jsonl":
        path = write_jsonl(folder / "d.jsonl", [entry(0), line])
    else:
        path = folder / "d.json"
        path.write_text("[" + json.dumps(entry(0)) + ", " + line + "]")
    ds = LlavaDataset(path, llama_tokenizer, image_view=ImageView(size=8))
    assert len(ds) == 1
    (reject,) = ds.index.rejects
    assert reject.reason == "bad_entry"
    ds[0]  # the good one loads


def test_a_lone_surrogate_outside_the_text_does_not_refuse_a_json_list(folder, llama_tokenizer):
    """A lone surrogate where the index does not look (the id, an extra key) must not make a
    .json list unreadable (it did: the whole file refused, without a location): the entry
    loads, its values as json.loads gives them, and so does the one after it."""
    odd = ('{"id": "s\\ud800", "note": "x\\udfff", "image": "img.png", "conversations": '
           '[{"from": "human", "value": "<image>\\nhi"}, {"from": "gpt", "value": "ok"}]}')
    path = folder / "d.json"
    path.write_text("[" + odd + ", " + json.dumps(entry(1)) + "]")
    ds = LlavaDataset(path, llama_tokenizer, image_view=ImageView(size=8))
    assert len(ds) == 2 and not ds.index.rejects
    assert ds.index.entry(0) == json.loads(odd) and ds.index.entry(0)["id"] == "s\ud800"
    assert isinstance(ds[0], Sample) and isinstance(ds[1], Sample)


def test_an_empty_image_path_is_a_bad_entry_not_a_text_sample(folder):
    line = json.dumps({"id": "blank", "image": " ", "conversations": [
        {"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "ok"}]})
    index = LlavaIndex(write_jsonl(folder / "d.jsonl", [entry(0), line]))
    assert len(index) == 1
    (reject,) = index.rejects
    assert reject.reason == "bad_entry" and "empty string" in reject.detail


@pytest.mark.parametrize("reason", sorted(BAD_LINES))
def test_index_time_bad_entries(folder, reason):
    path = write_jsonl(folder / "d.jsonl", [entry(0), BAD_LINES[reason], entry(2)])
    index = LlavaIndex(path)
    assert len(index) == 2
    (reject,) = index.rejects
    assert reject.reason == reason and reject.location == f"{path}:2"
    with pytest.raises(BadSampleError, match=f"{path}:2.*{reason}"):
        LlavaIndex(path, on_bad_sample="raise")


def test_malformed_json_file_and_top_level(folder):
    (folder / "bad.json").write_text('[{"id": 1},\n  {"id": ')
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        LlavaIndex(folder / "bad.json")
    (folder / "obj.json").write_text('{"id": 1}')
    with pytest.raises(ValueError, match="must hold a list of entries, got dict"):
        LlavaIndex(folder / "obj.json")
    # The two formats under each other's names: said so (not one malformed_json reject per
    # printed line of a pretty-printed list)
    entries = [entry(i) for i in range(3)]
    (folder / "list.jsonl").write_text(json.dumps(entries, indent=2))
    with pytest.raises(ValueError, match=r"list.jsonl: a .jsonl file holds one JSON object "
                                         r"per line, but this one starts a JSON list"):
        LlavaIndex(folder / "list.jsonl")
    write_jsonl(folder / "lines.json", entries)
    with pytest.raises(ValueError, match=r"lines.json: not valid JSON \(Extra data.*\) \(one "
                                         r"JSON object per line\? name it .jsonl\)"):
        LlavaIndex(folder / "lines.json")


def test_windows_separators_in_image_paths_find_the_file(folder, llama_tokenizer):
    """A data file written on Windows ("coco\\x.png"): the file under coco/ is read, as the
    target cache's key (image_key) already normalizes the separators."""
    (folder / "coco").mkdir()
    write_image(folder / "coco" / "x.png", size=(20, 20))
    (folder / "coco" / "train").mkdir()
    write_image(folder / "coco" / "train" / "y.png", size=(20, 20))
    images = ["coco\\x.png", "coco/train\\y.png", "coco\\train/y.png"]  # (mixed ones too)
    path = write_jsonl(folder / "d.jsonl", [entry(k, image=i) for k, i in enumerate(images)])
    ds = LlavaDataset(path, llama_tokenizer, image_view=ImageView(size=8))
    assert [ds[k].image_key for k in range(3)] == ["coco/x.png", "coco/train/y.png",
                                                   "coco/train/y.png"]


def _load_bad(folder, tokenizer, policy, **kw):
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    entries = [entry(0), entry(1, image="missing.png"), entry(2, image="corrupt.png"),
               entry(3, turns=30)]
    path = write_jsonl(folder / "d.jsonl", entries)
    return LlavaDataset(path, tokenizer, image_view=ImageView(size=8), on_bad_sample=policy, **kw)


def test_missing_and_corrupt_images(folder, llama_tokenizer):
    ds = _load_bad(folder, llama_tokenizer, "skip")
    assert isinstance(ds[0], Sample)
    missing, corrupt = ds[1], ds[2]
    assert isinstance(missing, Reject) and missing.reason == "missing_image"
    assert missing.sample_id == "s1" and missing.index == 1 and "missing.png" in missing.detail
    assert isinstance(corrupt, Reject) and corrupt.reason == "corrupt_image"
    raising = _load_bad(folder, llama_tokenizer, "raise")
    with pytest.raises(BadSampleError, match="s1.*missing_image"):
        raising[1]
    with pytest.raises(BadSampleError, match="corrupt_image"):
        raising[2]


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_a_view_that_cannot_be_built_is_a_corrupt_image_not_a_crash(folder, llama_tokenizer,
                                                                     monkeypatch):
    """A banner image (refused by load_image) and a pad view's oversized canvas (refused by
    the view, after the decode) are both corrupt_image rejects naming the file; the other
    samples come through."""
    Image.new("RGB", (4000, 2), (5, 5, 5)).save(folder / "banner.png")
    Image.new("RGB", (90, 60), (5, 5, 5)).save(folder / "wide.png")
    entries = [entry(0), entry(1, image="banner.png"), entry(2, image="wide.png")]
    path = write_jsonl(folder / "d.jsonl", entries)
    ds = LlavaDataset(path, llama_tokenizer, image_view=ImageView(size=8), on_bad_sample="skip")
    assert isinstance(ds[0], Sample) and isinstance(ds[2], Sample)
    assert ds[1].reason == "corrupt_image"
    assert "banner.png: ValueError: image 4000x2: aspect ratio" in ds[1].detail
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 90 * 90 // 2 - 1)
    padded = LlavaDataset(path, llama_tokenizer, image_view=ImageView(size=8, aspect="pad"),
                          on_bad_sample="skip")
    assert isinstance(padded[0], Sample)  # (the fixture images are smaller)
    assert padded[2].reason == "corrupt_image" and "needs a 90x90 canvas" in padded[2].detail


def _exif(entries) -> bytes:
    """An APP1 Exif payload: a big-endian TIFF header and one IFD of (tag, type, count, value)."""
    ifd = struct.pack(">H", len(entries)) + b"".join(
        struct.pack(">HHI", tag, kind, count) + value for tag, kind, count, value in entries)
    return b"Exif\0\0" + b"MM\0*" + struct.pack(">I", 8) + ifd + b"\0\0\0\0"


def test_damaged_exif_and_png_chunks_are_handled_not_fatal(folder, llama_tokenizer):
    """Web-scraped images with a malformed EXIF block (PIL raises TypeError / struct.error /
    SyntaxError while rotating) decode unrotated, as the seed's convert("RGB") reads them; a
    PNG with a damaged chunk (SyntaxError in load) is a counted corrupt_image. Both killed the
    loader's worker, and the epoch with it."""
    pixels = Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 40, 3), np.uint8))
    orient6 = (0x0112, 3, 1, struct.pack(">HH", 6, 0))  # Orientation 6: rotate
    jpeg = io.BytesIO()
    pixels.save(jpeg, "JPEG")
    jpeg = jpeg.getvalue()
    bad_exif = {"xres_ascii.jpg": _exif([orient6, (0x011A, 2, 3, b"72\0\0")]),
                "unit_ascii.jpg": _exif([orient6, (0x0128, 2, 2, b"2\0\0\0")])}
    for name, blob in bad_exif.items():
        app1 = b"\xff\xe1" + struct.pack(">H", len(blob) + 2) + blob
        (folder / name).write_bytes(jpeg[:2] + app1 + jpeg[2:])
    magic = bytearray(_exif([orient6]))
    magic[8] = 0x1F  # "MM\x1f*": not a TIFF header
    pixels.save(folder / "bad_magic.webp", "WEBP", exif=bytes(magic[6:]), lossless=True)
    png = io.BytesIO()
    pixels.save(png, "PNG")
    png = bytearray(png.getvalue())
    at = png.index(b"IDAT") - 4
    png[at:at + 4] = struct.pack(">I", 15)  # IDAT claims 15 bytes: the next "chunk" is garbage
    (folder / "broken_chunk.png").write_bytes(bytes(png))
    names = [*bad_exif, "bad_magic.webp", "broken_chunk.png"]
    path = write_jsonl(folder / "d.jsonl", [entry(k, image=n) for k, n in enumerate(names)])
    ds = LlavaDataset(path, llama_tokenizer, image_view=ImageView(size=8), keep_raw_image=True,
                      on_bad_sample="skip")
    for k, name in enumerate(names[:3]):
        sample = ds[k]
        assert isinstance(sample, Sample), (name, sample)
        seed = np.asarray(Image.open(folder / name).convert("RGB"))  # the seed's decode
        assert tuple(sample.raw_image.shape) == (3, 24, 40), name  # unrotated, as the seed's
        if name.endswith(".webp"):
            assert np.array_equal(sample.raw_image.permute(1, 2, 0).numpy(), seed)
    broken = ds[3]
    assert isinstance(broken, Reject) and broken.reason == "corrupt_image"
    assert "broken_chunk.png: SyntaxError: broken PNG file" in broken.detail
    loader = ResumableLoader(ds, batch_size=2, shuffle=False, num_workers=1)
    assert sum(len(batch) for batch in loader) == 3
    assert "corrupt_image=1" in loader.last_summary


def test_long_conversations_are_truncated_or_rejected(folder, llama_tokenizer):
    ds = _load_bad(folder, llama_tokenizer, "skip", max_length=64, num_image_tokens=8)
    long = ds[3]
    assert long.truncated and len(long.input_ids) == 64 - 7  # + 8 image positions - 1
    tiny = _load_bad(folder, llama_tokenizer, "skip", max_length=20, num_image_tokens=8)
    reject = tiny[0]
    assert isinstance(reject, Reject) and reject.reason == "too_long"


def test_skip_policy_counts_logs_and_summarizes_everything(folder, llama_tokenizer, caplog):
    (folder / "corrupt.png").write_bytes(b"not a png")
    lines = [entry(0), entry(1, image="missing.png"), BAD_LINES["malformed_json"],
             entry(3, image="corrupt.png"), BAD_LINES["no_conversations"], entry(5, turns=30),
             entry(6, image=None), BAD_LINES["bad_entry"], entry(8)]
    path = write_jsonl(folder / "d.jsonl", lines)
    ds = LlavaDataset(path, llama_tokenizer, image_view=ImageView(size=8), max_length=80,
                      num_image_tokens=4)
    rejects = folder / "rejects.jsonl"
    loader = ResumableLoader(ds, batch_size=2, shuffle=False, rejects_path=rejects)
    with caplog.at_level(logging.INFO, logger="olavlm.data"):
        ids = [sid for batch in loader for sid in batch.sample_ids]
    assert ids == ["s0", "s5", "s6", "s8"]
    logged = [json.loads(line) for line in rejects.read_text().splitlines()]
    by_reason = {r["reason"]: r for r in logged}
    assert sorted(by_reason) == ["bad_entry", "corrupt_image", "malformed_json",
                                 "missing_image", "no_conversations"]
    assert by_reason["malformed_json"]["location"] == f"{path}:3"
    assert by_reason["missing_image"]["sample_id"] == "s1"
    # Nothing dropped without being counted: every line is a sample used or a reject.
    assert len(ids) + len(logged) == len(lines)
    summary = loader.last_summary
    assert "4 samples used, 5 rejected" in summary and "1 truncated" in summary
    assert "missing_image=1" in summary and "malformed_json=1" in summary
    assert summary in caplog.text and caplog.records[-1].levelno == logging.WARNING


def test_samples_without_a_next_token_label_are_counted(folder, llama_tokenizer):
    """An empty answer, a conversation of one human turn and a prompt that fills max_length
    leave a sample no next-token label: it is used (its image still trains the heads) but the
    summary says how many, instead of counting them among the samples used unnoticed; the
    count is kept across a checkpoint of the loader."""
    empty = {"id": "empty", "image": "img.png", "conversations": [
        {"from": "human", "value": "<image>\nwhat?"}, {"from": "gpt", "value": ""}]}
    asked = {"id": "asked", "conversations": [{"from": "human", "value": "only a question"}]}
    long = {"id": "long", "conversations": [
        {"from": "human", "value": " ".join(["word"] * 200)}, {"from": "gpt", "value": "yes"}]}
    path = write_jsonl(folder / "d.jsonl", [entry(0), empty, asked, long, entry(4)])
    ds = LlavaDataset(path, llama_tokenizer, image_view=ImageView(size=8), max_length=80,
                      num_image_tokens=4)
    unlabelled = [ds[i].sample_id for i in range(5) if not (ds[i].labels != -100).any()]
    assert unlabelled == ["empty", "asked", "long"]  # the premise, from the samples themselves
    loader = ResumableLoader(ds, batch_size=2, shuffle=False)
    ids = [sid for batch in loader for sid in batch.sample_ids]
    assert ids == ["s0", "empty", "asked", "long", "s4"]
    assert "5 samples used (3 without a next-token label), 0 rejected" in loader.last_summary
    assert loader.last_stats["num_unlabelled"] == 3  # the epoch's log state (checkpointed)
    restored = ResumableLoader(ds, batch_size=2, shuffle=False)
    restored.log.load_state_dict(loader.last_stats)
    assert restored.log.num_unlabelled == 3
    restored.log.load_state_dict({"counts": {}})  # a checkpoint from before the count: 0
    assert restored.log.num_unlabelled == 0


@pytest.mark.parametrize("num_workers", [0, 1])
def test_raise_policy_stops_the_loader(folder, llama_tokenizer, num_workers):
    ds = _load_bad(folder, llama_tokenizer, "raise")
    loader = ResumableLoader(ds, batch_size=4, shuffle=False, num_workers=num_workers)
    with pytest.raises(BadSampleError, match="missing_image"):
        next(iter(loader))


def test_index_lengths_feed_grouping(folder):
    path = write_jsonl(folder / "d.jsonl", [entry(i, image=None if i % 2 else "img.png")
                                            for i in range(6)])
    lengths = LlavaIndex(path).modality_lengths
    assert (np.sign(lengths) == [1, -1, 1, -1, 1, -1]).all()
