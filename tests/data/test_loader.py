# Collation, epoch plans, the 2-rank split, length grouping and mid-epoch resume.
from __future__ import annotations

import pytest
import torch
from datahelpers import entry, write_image, write_jsonl

from olavlm.data import (
    IGNORE_INDEX,
    Collator,
    ImageView,
    LlavaDataset,
    ResumableLoader,
    plan_epoch,
)

NUM = 23  # prime: no batch size divides it, so every tail case shows up


@pytest.fixture
def dataset(tmp_path, llama_tokenizer):
    write_image(tmp_path / "img.png", size=(12, 10))
    # Every third sample is text-only; turns vary so lengths (and grouping) vary.
    entries = [entry(i, image=None if i % 3 == 2 else "img.png", turns=1 + i % 4)
               for i in range(NUM)]
    path = write_jsonl(tmp_path / "d.jsonl", entries)
    return LlavaDataset(path, llama_tokenizer, image_view=ImageView(size=8))


def _ids(batches) -> list[str]:
    return [sid for b in batches for sid in b.sample_ids]


def test_collation_pads_right_and_masks(dataset, llama_tokenizer):
    samples = [dataset[0], dataset[2], dataset[3]]  # image, text-only, image (4 turns)
    batch = Collator(llama_tokenizer.pad_token_id, dataset.image_view)(samples)
    lengths = [len(s.input_ids) for s in samples]
    assert batch.input_ids.shape == (3, max(lengths)) and len(batch) == 3
    for row, (s, n) in enumerate(zip(samples, lengths, strict=True)):
        assert batch.input_ids[row, :n].tolist() == s.input_ids.tolist()
        assert batch.labels[row, :n].tolist() == s.labels.tolist()
        assert (batch.input_ids[row, n:] == llama_tokenizer.pad_token_id).all()
        assert (batch.labels[row, n:] == IGNORE_INDEX).all()
        assert batch.attention_mask[row].tolist() == [True] * n + [False] * (max(lengths) - n)
    assert batch.image_mask.tolist() == [1, 0, 1] and batch.image_mask.dtype == torch.long
    assert batch.images.shape == (3, 3, 8, 8) and batch.images[1].abs().sum() == 0
    assert [t.shape for t in batch.raw_images] == [(3, 10, 12), (3, 8, 8), (3, 10, 12)]
    assert batch.sample_ids == ["s0", "s2", "s3"] and batch.indices == [0, 2, 3]
    padded = Collator(llama_tokenizer.pad_token_id, dataset.image_view, pad_to_multiple_of=64)
    assert padded(samples).input_ids.shape[1] % 64 == 0
    moved = batch.to("cpu")
    assert torch.equal(moved.input_ids, batch.input_ids)


def test_epoch_covers_the_dataset_once_and_reshuffles(dataset):
    loader = ResumableLoader(dataset, batch_size=4, seed=1)
    assert len(loader) == 6
    first = _ids(loader)
    assert sorted(first) == sorted(f"s{i}" for i in range(NUM)) and loader.epoch == 1
    second = _ids(loader)
    assert sorted(second) == sorted(first) and second != first  # a new permutation
    again = ResumableLoader(dataset, batch_size=4, seed=1)
    assert _ids(again) == first  # a pure function of (seed, epoch)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_epoch_yields_exactly_the_remaining_samples(dataset, num_workers):
    reference = _ids(ResumableLoader(dataset, batch_size=3, seed=7))
    loader = ResumableLoader(dataset, batch_size=3, seed=7, num_workers=num_workers)
    seen = []
    for k, batch in enumerate(loader):
        seen += batch.sample_ids
        if k == 2:
            state = loader.state_dict()  # the workers have prefetched beyond this point
            break
    assert state["epoch"] == 0 and state["position"] == 9 and state["stats"]["num_samples"] == 9
    resumed = ResumableLoader(dataset, batch_size=3, seed=7, num_workers=num_workers)
    resumed.load_state_dict(state)
    rest = _ids(resumed)
    assert seen + rest == reference
    assert resumed.epoch == 1 and resumed.position == 0
    # workers ignore the stop signals the trainer handles (tests/train/test_trainer_faults.py)
    from olavlm.data.loader import _ignore_stop_signals

    assert loader._dataloader.worker_init_fn is (_ignore_stop_signals if num_workers else None)


def test_iterating_leaves_the_global_rng_alone(dataset):
    """A resumed run starts its pass mid-epoch: were the pass to draw from the global RNG (the
    DataLoader's worker seed), dropout after a resume would differ from the run it continues."""
    loader = ResumableLoader(dataset, batch_size=4, seed=1)
    before = torch.get_rng_state()
    next(iter(loader))
    assert torch.equal(torch.get_rng_state(), before)


def test_two_ranks_cover_the_dataset_once(dataset):
    ranks = [ResumableLoader(dataset, batch_size=4, rank=r, world_size=2, seed=3)
             for r in range(2)]
    batches = [list(loader) for loader in ranks]
    assert len(batches[0]) == len(batches[1]) == len(ranks[0]) == 3  # lockstep steps
    ids = [_ids(b) for b in batches]
    assert not set(ids[0]) & set(ids[1])
    assert sorted(ids[0] + ids[1]) == sorted(f"s{i}" for i in range(NUM))
    assert [len(b) for b in batches[0]] == [4, 4, 4] and [len(b) for b in batches[1]] == [4, 4, 3]


def test_tail_that_cannot_feed_every_rank_is_dropped_and_counted(dataset):
    loader = ResumableLoader(dataset, batch_size=11, rank=0, world_size=2, seed=0)
    assert len(_ids(loader)) == 11  # 23 = 22 + 1: the last sample cannot feed both ranks
    assert "1 dropped by batching" in loader.last_summary
    last = ResumableLoader(dataset, batch_size=4, drop_last=True)
    assert len(_ids(last)) == 20 and "3 dropped by batching" in last.last_summary


def test_modality_grouping_keeps_batches_single_modality(dataset):
    world, size = 2, 2
    image = {f"s{i}" for i in range(NUM) if i % 3 != 2}
    loaders = [ResumableLoader(dataset, batch_size=size, rank=r, world_size=world, seed=5,
                               group_by_modality_length=True) for r in range(world)]
    per_rank = [list(loader) for loader in loaders]
    assert sorted(_ids(per_rank[0]) + _ids(per_rank[1])) == sorted(f"s{i}" for i in range(NUM))
    steps = list(zip(*per_rank, strict=True))
    # LLaVA: only the final megabatch (both modalities' leftovers, up to two global batches)
    # mixes them.
    for step in steps[:-2]:
        kinds = {sid in image for b in step for sid in b.sample_ids}
        assert len(kinds) == 1


def test_plan_matches_llava_megabatch_layout():
    lengths = [5, -3, 8, -2, 9, 1, -7, 4, 6, -1]
    plan = plan_epoch(10, epoch=0, batch_size=2, world_size=2, seed=0, modality_lengths=lengths)
    flat = [i for gb in plan.global_batches for i in gb]
    assert sorted(flat) == list(range(10)) and plan.num_dropped == 0
    again = plan_epoch(10, epoch=0, batch_size=2, world_size=2, seed=0, modality_lengths=lengths)
    assert again.global_batches == plan.global_batches  # no global RNG involved
    # LLaVA groups within megabatches of world x batch x grad_accum (one optimizer step): one
    # GPU accumulating 2 micro-batches sees the order 2 GPUs see.
    one_gpu = plan_epoch(10, epoch=0, batch_size=2, world_size=1, seed=0,
                         modality_lengths=lengths, grad_accum=2)
    assert [i for gb in one_gpu.global_batches for i in gb] == flat
    ungrouped = plan_epoch(10, epoch=0, batch_size=2, world_size=1, seed=0, grad_accum=2)
    assert ungrouped.global_batches == plan_epoch(10, epoch=0, batch_size=2, world_size=1,
                                                  seed=0).global_batches
    with pytest.raises(ValueError, match="non-zero"):
        plan_epoch(2, epoch=0, batch_size=1, modality_lengths=[0, 1])


def test_resume_checks_the_state(dataset):
    loader = ResumableLoader(dataset, batch_size=4, seed=1)
    next(iter(loader))
    state = loader.state_dict()
    with pytest.raises(ValueError, match=r"state\['seed'\] must be 2"):
        ResumableLoader(dataset, batch_size=4, seed=2).load_state_dict(state)
    grouped = ResumableLoader(dataset, batch_size=4, seed=1, group_by_modality_length=True)
    with pytest.raises(ValueError, match="group_by_modality_length"):
        grouped.load_state_dict(state)
    with pytest.raises(ValueError, match="version"):
        loader.load_state_dict({"version": 99})
    grouped.load_state_dict(grouped.state_dict())
    with pytest.raises(ValueError, match="grad_accum"):  # the grouped order depends on it
        ResumableLoader(dataset, batch_size=4, seed=1, group_by_modality_length=True,
                        grad_accum=2).load_state_dict(grouped.state_dict())


def test_a_state_saved_before_grad_accum_finishes_its_epoch_in_its_order(dataset):
    old = ResumableLoader(dataset, batch_size=2, seed=1, group_by_modality_length=True)
    it = iter(old)
    next(it)
    state = old.state_dict()
    del state["grad_accum"]  # what a checkpoint written before the key existed holds
    rest = [b.sample_ids for b in it]
    new = ResumableLoader(dataset, batch_size=2, seed=1, group_by_modality_length=True,
                          grad_accum=2)
    new.load_state_dict(state)
    assert [b.sample_ids for b in new] == rest  # the epoch it was in: the old megabatches
    assert new.epoch == 1 and new.plan() == plan_epoch(
        len(dataset), epoch=1, batch_size=2, seed=1, grad_accum=2,
        modality_lengths=dataset.modality_lengths)  # then the new ones


def test_resume_on_another_world_size_without_grouping(dataset):
    reference = _ids(ResumableLoader(dataset, batch_size=4, seed=2))
    one = ResumableLoader(dataset, batch_size=4, seed=2)
    it = iter(one)
    seen = _ids([next(it), next(it)])
    state = one.state_dict()
    rest = []
    for r in range(2):  # continue on 2 ranks with a smaller per-rank batch
        two = ResumableLoader(dataset, batch_size=3, rank=r, world_size=2, seed=2)
        two.load_state_dict(state)
        rest += _ids(two)
    assert sorted(seen + rest) == sorted(reference) and len(seen + rest) == NUM


def test_loader_arguments_are_checked(dataset):
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        ResumableLoader(dataset, batch_size=0)
    with pytest.raises(ValueError, match=r"rank must be an int in \[0, 2\), got 2"):
        ResumableLoader(dataset, batch_size=1, rank=2, world_size=2)
    if not torch.cuda.is_available():
        with pytest.warns(UserWarning, match="pin_memory=True needs a CUDA device"):
            ResumableLoader(dataset, batch_size=1, pin_memory=True)


def _with_missing_images(tmp_path, tokenizer, num: int, missing_every: int):
    write_image(tmp_path / "img.png", size=(12, 10))
    entries = [entry(i, image="gone.png" if i % missing_every == 0 else "img.png")
               for i in range(num)]
    return LlavaDataset(write_jsonl(tmp_path / "m.jsonl", entries), tokenizer,
                        image_view=ImageView(size=8))


def test_too_many_rejected_samples_stop_the_epoch_with_the_reason(tmp_path, llama_tokenizer):
    """A wrong image folder: almost every sample's image is missing. Past 64 samples and more
    than max_reject_fraction of them rejected, iteration stops and says why (the default of
    the library, 1.0, never stops)."""
    from olavlm.data.loader import REJECT_CHECK_AFTER, TooManyRejectsError

    ds = _with_missing_images(tmp_path, llama_tokenizer, 100, missing_every=1)
    loader = ResumableLoader(ds, batch_size=8, shuffle=False, max_reject_fraction=0.5)
    with pytest.raises(TooManyRejectsError, match=r"missing_image=\d+.*gone\.png") as exc:
        list(loader)
    seen = int(str(exc.value).split(" of ")[1].split()[0])
    assert REJECT_CHECK_AFTER <= seen < REJECT_CHECK_AFTER + 8  # stopped at the first check
    assert len(list(ResumableLoader(ds, batch_size=8, shuffle=False))) > 0  # 1.0: all batches


def test_a_reject_rate_under_the_limit_trains_on(tmp_path, llama_tokenizer):
    ds = _with_missing_images(tmp_path, llama_tokenizer, 100, missing_every=3)  # 34% missing
    loader = ResumableLoader(ds, batch_size=8, shuffle=False, max_reject_fraction=0.5)
    assert sum(len(b) for b in loader) == 66
    assert "missing_image=34" in loader.last_summary
    with pytest.raises(ValueError, match="max_reject_fraction must be in"):
        ResumableLoader(ds, batch_size=8, max_reject_fraction=1.5)


@pytest.mark.parametrize("name, rank0s", [("rejects.jsonl", r"rejects\.rank0\.jsonl"),
                                          ("rejects", r"rejects\.rank0\)")])  # no suffix
def test_index_time_rejects_point_to_rank0s_file(tmp_path, llama_tokenizer, name, rank0s):
    """Only rank 0 writes the rejects found while indexing: another rank's error names that
    file, not its own."""
    from olavlm.data.loader import TooManyRejectsError

    write_image(tmp_path / "img.png", size=(12, 10))
    path = tmp_path / "bad.jsonl"
    lines = ["{not json"] * 6 + [__import__("json").dumps(entry(i)) for i in range(4)]
    path.write_text("\n".join(lines) + "\n")
    ds = LlavaDataset(path, llama_tokenizer, image_view=ImageView(size=8))
    loader = ResumableLoader(ds, batch_size=2, rank=1, world_size=2, max_reject_fraction=0.5,
                             rejects_path=tmp_path / name)
    with pytest.raises(TooManyRejectsError, match=r"6 of 10 entries.*" + rank0s):
        next(iter(loader))


def test_index_rejects_are_written_once_across_resumes(tmp_path, llama_tokenizer):
    """The rejects found while indexing go to the file at the first pass; a resumed run (a new
    loader with the state loaded) must not append them again."""
    import json

    write_image(tmp_path / "img.png", size=(12, 10))
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join([json.dumps(entry(0)), "{not json", json.dumps(entry(1)),
                               json.dumps(entry(2))]) + "\n")
    ds = LlavaDataset(path, llama_tokenizer, image_view=ImageView(size=8))
    rejects = tmp_path / "run" / "rejects.jsonl"
    state = None
    for _ in range(3):  # the first start, then two resumes
        loader = ResumableLoader(ds, batch_size=1, shuffle=False, rejects_path=rejects)
        if state is not None:
            loader.load_state_dict(state)
        next(iter(loader))
        state = loader.state_dict()
    lines = [json.loads(x) for x in rejects.read_text().splitlines()]
    assert [x["reason"] for x in lines] == ["malformed_json"]
    # A fresh run (no state) over the same file writes them again: it is another run.
    next(iter(ResumableLoader(ds, batch_size=1, rejects_path=rejects)))
    assert len(rejects.read_text().splitlines()) == 2


@pytest.mark.parametrize("world_size", [1, 2])
def test_a_resume_does_not_list_the_redone_steps_rejects_twice(tmp_path, llama_tokenizer,
                                                                world_size):
    """Killed after a checkpoint: the batches after it wrote their rejects, then the resumed
    run hands those batches out again. The file must read as the uninterrupted run's."""
    import json

    ds = _with_missing_images(tmp_path, llama_tokenizer, 24, missing_every=3)

    def loader_for(rank, folder):
        return ResumableLoader(ds, batch_size=2, shuffle=True, seed=3, rank=rank,
                               world_size=world_size, rejects_path=folder / "rejects.jsonl")

    def lines(folder):
        return sorted(p.read_text() for p in folder.glob("rejects*.jsonl"))

    whole = tmp_path / "whole"
    for rank in range(world_size):
        list(loader_for(rank, whole))
    crashed = tmp_path / "crashed"
    states = []
    for rank in range(world_size):
        loader = loader_for(rank, crashed)
        it = iter(loader)
        next(it), next(it)
        states.append(loader.state_dict())  # the checkpoint
        next(it), next(it)  # steps after it, then killed: their rejects are in the file
    assert lines(crashed) != lines(whole)
    for rank in range(world_size):
        resumed = loader_for(rank, crashed)
        resumed.load_state_dict(states[rank])
        list(resumed)
    assert lines(crashed) == lines(whole)
    assert all(json.loads(x)["reason"] == "missing_image"
               for text in lines(crashed) for x in text.splitlines())


def test_rewinding_the_rejects_file_never_cuts_a_record(tmp_path):
    """A recorded size that is not at a line's end (a state saved over another run's file) is
    left alone rather than cutting a record in half."""
    from olavlm.data.bad_data import RejectLog

    path = tmp_path / "rejects.jsonl"
    path.write_text('{"a": 1}\n{"b": 2}\n')
    log = RejectLog(path)
    log.rewind_file({"name": "rejects.jsonl", "bytes": 5})
    assert path.read_text() == '{"a": 1}\n{"b": 2}\n'
    log.rewind_file({"name": "rejects.jsonl", "bytes": 9})
    assert path.read_text() == '{"a": 1}\n'
    log.rewind_file({"name": "other.jsonl", "bytes": 0})
    assert path.read_text() == '{"a": 1}\n'
    log.rewind_file({"name": "rejects.jsonl", "bytes": 0})
    assert path.read_text() == ""


def test_reject_logs_of_several_ranks_merge_with_shared_rejects_once():
    """The run's data line sums the ranks' counts; the index's rejects (found once while
    indexing, counted in every rank's epoch) stay counted once."""
    from collections import Counter

    from olavlm.data.bad_data import RejectLog

    rank0 = {"counts": {"bad_entry": 2, "missing_image": 1}, "num_truncated": 1,
             "num_unlabelled": 0, "num_samples": 10, "num_dropped": 0,
             "target_counts": {"no_target": 1}}
    rank1 = {"counts": {"bad_entry": 2, "corrupt_image": 3}, "num_truncated": 0,
             "num_unlabelled": 2, "num_samples": 9, "num_dropped": 1, "target_counts": {}}
    log = RejectLog.merged([rank0, rank1], shared=Counter({"bad_entry": 2}))
    assert log.counts == {"bad_entry": 2, "missing_image": 1, "corrupt_image": 3}
    assert (log.num_samples, log.num_truncated, log.num_unlabelled, log.num_dropped) == \
        (19, 1, 2, 1)
    assert log.target_counts == {"no_target": 1}
    assert "19 samples used (2 without a next-token label), 6 rejected" in log.summary(0)


def test_a_resume_on_another_world_size_keeps_the_jobs_counts_once(dataset):
    """The epoch's counts so far after a world-size change: 1 -> 2 ranks gives rank 0 the
    job's and rank 1 none (it copied rank 0's: counted twice); 2 -> 1 takes the job's counts
    the checkpoint summed ("job_stats"), not rank 0's alone."""
    from olavlm.data.bad_data import RejectLog

    one = ResumableLoader(dataset, batch_size=4, seed=2)
    it = iter(one)
    next(it), next(it)
    state = one.state_dict()
    used = one.log.num_samples
    assert used == 8
    two = [ResumableLoader(dataset, batch_size=3, rank=r, world_size=2, seed=2)
           for r in range(2)]
    for loader in two:
        loader.load_state_dict(state)
    assert [loader.log.num_samples for loader in two] == [used, 0]
    # Back to one rank from a two-rank checkpoint: the summed counts (as the trainer stores).
    parts = []
    for loader in two:
        it = iter(loader)
        next(it)
        parts.append(loader.log.state_dict())
    job = RejectLog.merged(parts, shared=two[0].index_reject_counts()).state_dict()
    saved = two[0].state_dict() | {"job_stats": job}
    back = ResumableLoader(dataset, batch_size=4, seed=2)
    back.load_state_dict(saved)
    assert back.log.num_samples == used + 3 + 3 == job["num_samples"]


def test_grouped_resume_keeps_the_order_when_world_size_x_grad_accum_stays(dataset):
    """Length grouping sorts within megabatches of world_size x grad_accum batches: 2 ranks x
    grad_accum 1 resumed as 1 rank x grad_accum 2 visits the same samples in the same order
    (it was refused); another product is refused, naming both."""
    opts = dict(batch_size=2, seed=5, group_by_modality_length=True)
    reference = _ids(ResumableLoader(dataset, grad_accum=2, **opts))
    two = [ResumableLoader(dataset, rank=r, world_size=2, **opts) for r in range(2)]
    iters = [iter(loader) for loader in two]
    first = [next(it) for it in iters]  # one global batch: 4 samples
    one = ResumableLoader(dataset, grad_accum=2, **opts)
    one.load_state_dict(two[0].state_dict())
    assert sorted(_ids(first)) == sorted(reference[:4])
    assert _ids(one) == reference[4:]
    with pytest.raises(ValueError, match=r"world_size x grad_accum must be 1 x 1 = 1 .* got "
                                         r"2 x 1 = 2"):
        ResumableLoader(dataset, **opts).load_state_dict(two[0].state_dict())


def test_a_resume_on_another_world_size_cuts_back_every_old_rejects_file(tmp_path,
                                                                          llama_tokenizer):
    """Two ranks checkpoint (every rank's rejects-file position in the state, as the trainer
    gathers it), write more, are killed; one rank resumes: the old rank files are cut back to
    the checkpoint, so the redone steps' rejects are listed once (in the new file)."""
    import json

    ds = _with_missing_images(tmp_path, llama_tokenizer, 24, missing_every=3)
    folder = tmp_path / "run"
    ranks = [ResumableLoader(ds, batch_size=2, shuffle=True, seed=3, rank=r, world_size=2,
                             rejects_path=folder / "rejects.jsonl") for r in range(2)]
    iters = [iter(loader) for loader in ranks]
    for it in iters:
        next(it), next(it)
    files = [loader.log.file_state() for loader in ranks]
    state = ranks[0].state_dict() | {"job_rejects_files": files}
    for it in iters:
        next(it), next(it)  # after the checkpoint, then killed
    one = ResumableLoader(ds, batch_size=4, shuffle=True, seed=3,
                          rejects_path=folder / "rejects.jsonl")
    one.load_state_dict(state)
    list(one)
    ids = [json.loads(line)["sample_id"] for p in folder.glob("rejects*.jsonl")
           for line in p.read_text().splitlines()]
    assert ids and len(ids) == len(set(ids)), sorted(ids)
