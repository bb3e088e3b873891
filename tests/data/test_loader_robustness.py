# The loader under failure: dying workers, unexpected exceptions, changed data files, huge images.
from __future__ import annotations

import io
import json
import os
import signal
import struct
import zlib

import pytest
from datahelpers import entry, write_image, write_jsonl
from PIL import Image

from olavlm.data import ImageView, LlavaDataset, ResumableLoader
from olavlm.data.loader import LoaderStateMismatch

NUM = 12


class _Failing(LlavaDataset):
    """Sample 5 fails in the way ``how`` says (in whichever process loads it)."""

    how = "raise"

    def __getitem__(self, i):
        if i == 5:
            if self.how == "exit":
                os._exit(3)  # a native crash or the OOM killer: no Python exception
            if self.how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if self.how == "raise":
                raise KeyError("a bug, not bad data")
        return super().__getitem__(i)


def _failing(tmp_path, tokenizer, how):
    write_image(tmp_path / "img.png", size=(12, 10))
    path = write_jsonl(tmp_path / "d.jsonl", [entry(i) for i in range(NUM)])
    ds = _Failing(path, tokenizer, image_view=ImageView(size=8))
    ds.how = how
    return ds


@pytest.mark.parametrize("how", ["exit", "kill"])
def test_a_dead_worker_names_the_samples_it_was_loading(tmp_path, llama_tokenizer, how):
    """A worker that dies inside __getitem__ (a segfaulting decoder, the OOM killer) stops the
    epoch at once with an error naming the worker and the samples it held, not only a pid."""
    ds = _failing(tmp_path, llama_tokenizer, how)
    loader = ResumableLoader(ds, batch_size=2, shuffle=False, num_workers=2)
    with pytest.raises(RuntimeError, match="DataLoader worker") as exc:
        list(loader)
    assert f"{tmp_path / 'd.jsonl'}:6" in str(exc.value)  # sample 5's line
    assert "epoch 0" in str(exc.value)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_an_unexpected_exception_propagates_naming_its_sample(tmp_path, llama_tokenizer,
                                                              num_workers):
    """A bug in __getitem__ (not bad data) is raised, with its type, never counted as a reject
    nor dropped; its message says which sample it was."""
    ds = _failing(tmp_path, llama_tokenizer, "raise")
    rejects = tmp_path / "rejects.jsonl"
    loader = ResumableLoader(ds, batch_size=2, shuffle=False, num_workers=num_workers,
                             rejects_path=rejects)
    with pytest.raises(KeyError) as exc:
        list(loader)
    text = str(exc.value) + "".join(getattr(exc.value, "__notes__", []))
    assert "a bug, not bad data" in text
    assert f"{tmp_path / 'd.jsonl'}:6" in text and "'s5'" in text
    assert not rejects.exists() or rejects.read_text() == ""


@pytest.mark.parametrize(("before", "after"), [(0, 2), (2, 0)])
def test_a_resume_with_other_workers_yields_the_same_batches(tmp_path, llama_tokenizer, before,
                                                              after):
    write_image(tmp_path / "img.png", size=(12, 10))
    path = write_jsonl(tmp_path / "d.jsonl", [entry(i) for i in range(NUM)])
    ds = LlavaDataset(path, llama_tokenizer, image_view=ImageView(size=8))
    whole = [b.sample_ids for b in ResumableLoader(ds, batch_size=2, seed=4)]
    first = ResumableLoader(ds, batch_size=2, seed=4, num_workers=before)
    it = iter(first)
    seen = [next(it).sample_ids for _ in range(2)]
    state = first.state_dict()
    del it
    resumed = ResumableLoader(ds, batch_size=2, seed=4, num_workers=after)
    resumed.load_state_dict(state)
    assert seen + [b.sample_ids for b in resumed] == whole


@pytest.mark.parametrize("grouped", [False, True])
def test_a_data_file_with_an_entry_added_and_one_removed_is_refused_on_resume(
        tmp_path, llama_tokenizer, grouped):
    """The same number of entries is not the same data: an entry removed and another appended
    shifts every later index, so the resumed epoch would repeat some samples and skip others
    (and with length grouping visit them in another order)."""
    write_image(tmp_path / "img.png", size=(12, 10))
    entries = [entry(i, image=None if i % 3 == 2 else "img.png", turns=1 + i % 4)
               for i in range(NUM)]
    path = write_jsonl(tmp_path / "d.jsonl", entries)

    def loader():
        ds = LlavaDataset(path, llama_tokenizer, image_view=ImageView(size=8))
        return ResumableLoader(ds, batch_size=2, seed=1, group_by_modality_length=grouped)

    first = loader()
    next(iter(first))
    state = first.state_dict()
    assert len(json.dumps(state)) < 2000  # small: no per-sample lists
    loader().load_state_dict(state)  # the same file: fine
    write_jsonl(path, entries[:3] + entries[4:] + [entry(NUM, turns=3)])
    with pytest.raises(LoaderStateMismatch, match="the data changed.*12 entries"):
        loader().load_state_dict(state)
    legacy = {k: v for k, v in state.items() if k != "data_digest"}
    loader().load_state_dict(legacy)  # a state from before the digest: the count only


def _png_header_claiming(width: int, height: int) -> bytes:
    """A valid 1 x 1 PNG whose header says width x height (PIL checks the size at open)."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    struct.pack_into(">II", data, 16, width, height)  # IHDR's data starts at byte 16
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def test_a_decompression_bomb_is_a_corrupt_image_reject(tmp_path, llama_tokenizer):
    """A 20000 x 20000 PNG (400M pixels, past PIL's 2 x MAX_IMAGE_PIXELS) is refused before
    anything is decoded, as docs/data.md says: a counted corrupt_image naming PIL's error."""
    (tmp_path / "bomb.png").write_bytes(_png_header_claiming(20000, 20000))
    write_image(tmp_path / "img.png", size=(12, 10))
    path = write_jsonl(tmp_path / "d.jsonl", [entry(0, image="bomb.png"), entry(1)])
    ds = LlavaDataset(path, llama_tokenizer, image_view=ImageView(size=8))
    batches = list(ResumableLoader(ds, batch_size=2, shuffle=False, num_workers=1))
    assert [b.sample_ids for b in batches] == [["s1"]]
    (reject,) = batches[0].rejects
    assert reject.reason == "corrupt_image" and "DecompressionBombError" in reject.detail


def test_a_worker_killed_mid_send_is_named_too(tmp_path, llama_tokenizer):
    """Killed while its queue thread was sending a batch, a worker leaves a cut message; torch
    re-raises that EOFError as is when it looks before the process is reaped (seen 1 in ~10
    runs of the test above): it is reported as the dead worker too."""
    from types import SimpleNamespace

    ds = _failing(tmp_path, llama_tokenizer, "none")
    loader = ResumableLoader(ds, batch_size=2, shuffle=False)
    loader._batch_sampler.batches = [[0, 1], [4, 5]]

    class CutPipe:
        _workers = [SimpleNamespace(is_alive=lambda: True),
                    SimpleNamespace(is_alive=lambda: False)]
        _task_info = {0: (0,), 1: (1,)}

        def __next__(self):
            raise EOFError

    with pytest.raises(RuntimeError, match=r"epoch 0: it was loading sample 4 .*d\.jsonl:5"):
        next(loader._naming_dead_workers(CutPipe()))
    CutPipe._workers[1].is_alive = lambda: True  # no worker died: the error as it was
    with pytest.raises(EOFError):
        next(loader._naming_dead_workers(CutPipe()))
