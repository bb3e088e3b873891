# The per-rank data path of a real 2-process (gloo, FSDP2) job: sharding, epoch ends, summaries.
from __future__ import annotations

import json
import os
import re
import time

import pytest
import torch.multiprocessing as mp

from olavlm.config import resolve_config
from olavlm.train.metrics import read_metrics
from olavlm.train.parallel import free_port
from olavlm.train.trainer import Trainer

TIMEOUT_S = 420  # a hang (one rank in a collective the other never joins) fails, not blocks


def _run_two_ranks(worker, *args, timeout: float = TIMEOUT_S) -> None:
    """``worker(rank, 2, port, *args)`` in 2 spawned processes; fails when either is still
    running after ``timeout`` seconds (killed) or exits non-zero."""
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=worker, args=(rank, 2, port, *args)) for rank in range(2)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [rank for rank, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert not hung, f"ranks {hung} still running after {timeout} s (a hang)"
    assert [p.exitcode for p in procs] == [0, 0]


def _overrides(tmp, name, num, *extra):
    return [f"train.output_dir={tmp}/runs", f"data.synthetic_dir={tmp}/synth-{num}",
            f"data.synthetic_num={num}", "data.batch_size=1", "logging.progress=false",
            "logging.plot=false", f"train.run_name={name}", "parallel.fsdp=on", *extra]


def _epochs_worker(rank, world, port, tmp, out_file):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist

    results = {}
    # One sample for two ranks: no global batch can give both one.
    try:
        Trainer(resolve_config("demo", None, _overrides(tmp, "one", 1, "train.max_steps=0")))
        results["one"] = "started"
    except ValueError as exc:
        results["one"] = str(exc)
    # Nine samples, batch 1, two ranks: four global batches, the ninth sample dropped.
    epoch_mode = _overrides(tmp, "nine", 9, "train.max_steps=0", "train.epochs=1",
                            "optim.grad_accum=2", "checkpoint.every_steps=0")
    trainer = Trainer(resolve_config("demo", None, epoch_mode))
    seen = []
    micro_step = trainer._micro_step

    def recording(batch, *args):
        seen.extend(batch.indices)
        return micro_step(batch, *args)

    trainer._micro_step = recording
    result = trainer.train()
    gathered = [None] * world
    dist.all_gather_object(gathered, seen)
    results.update(steps=result.steps, total=trainer.total_steps, seen=gathered,
                   summary=(trainer.run_dir / "summary.txt").read_text() if rank == 0 else "")
    # The same command again (resume=auto from the final checkpoint): nothing is left.
    again = Trainer(resolve_config("demo", None, [*epoch_mode, "checkpoint.resume=auto"]))
    results["again"] = [again.step, again.total_steps, again.train().steps]
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


@pytest.mark.distributed
@pytest.mark.slow
def test_two_ranks_epoch_mode_shards_once_reports_the_dropped_sample_and_refuses_no_data(
        tmp_path):
    """Epoch mode on 2 ranks: every sample trained once across the ranks except the one a
    global batch cannot share, which the run's data line reports as dropped, once (the last
    epoch was never closed, so it said nothing; a closed epoch's drop was counted by every
    rank). Fewer samples than ranks is refused at the start (it "finished" after 0 steps,
    exit status 0, saying batches were rejected)."""
    out_file = tmp_path / "results.json"
    _run_two_ranks(_epochs_worker, str(tmp_path), str(out_file))
    got = json.loads(out_file.read_text())
    assert "the data has 1 samples, fewer than the 2 ranks" in got["one"]
    assert not (tmp_path / "runs" / "one").exists()  # a failed start leaves no folder
    assert got["steps"] == got["total"] == 2
    first, second = got["seen"]
    assert len(first) == len(second) == 4 and not set(first) & set(second)
    assert len(set(first) | set(second)) == 8 and set(first) | set(second) <= set(range(9))
    run = tmp_path / "runs" / "nine"
    assert [r["step"] for r in read_metrics(run)] == [1, 2]
    data_line = got["summary"].splitlines()[-1]
    assert re.fullmatch(r"data, 2 ranks: epoch 0: 8 samples used.*, 1 dropped by batching",
                        data_line), data_line
    assert got["again"] == [2, 2, 2]
    assert [r["step"] for r in read_metrics(run)] == [1, 2]


def _first_batch_rejected_worker(rank, world, port, tmp, data, out_file):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist

    overrides = [f"train.output_dir={tmp}/runs", f"data.path={data}/train.jsonl",
                 f"data.tokenizer={data}/tokenizer", "data.shuffle=false", "data.batch_size=1",
                 "train.max_steps=2", "train.run_name=first", "parallel.fsdp=on",
                 "logging.progress=false", "logging.plot=false"]
    trainer = Trainer(resolve_config("demo", None, overrides))
    ran = []
    micro_step = trainer._micro_step

    def recording(batch, *args):
        ran.append((batch.sample_ids, batch.stand_in))
        return micro_step(batch, *args)

    trainer._micro_step = recording
    result = trainer.train()
    gathered = [None] * world
    dist.all_gather_object(gathered, ran)
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump({"steps": result.steps, "ran": gathered}, f)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


@pytest.mark.distributed
@pytest.mark.slow
def test_a_rank_whose_first_batch_is_rejected_whole_runs_a_made_up_stand_in(tmp_path):
    """Rank 1's first sample has no image file: its first batch is rejected whole before it
    had one of its own to stand in. It runs a text-only stand-in the loader makes up (nothing
    to learn from) and the job goes on; it used to stop, leaving rank 0 in a collective."""
    from olavlm.data.synthetic import write_synthetic_dataset

    data = tmp_path / "d"
    write_synthetic_dataset(data, 8, size=32, text_only_fraction=0.0)
    entries = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
    (data / entries[1]["image"]).unlink()  # unshuffled, batch 1: rank 1's first sample
    out_file = tmp_path / "results.json"
    _run_two_ranks(_first_batch_rejected_worker, str(tmp_path), str(data), str(out_file),
                   timeout=240)
    got = json.loads(out_file.read_text())
    assert got["steps"] == 2
    first, second = got["ran"]
    ids = [str(e.get("id")) for e in entries]
    assert first == [[[ids[0]], False], [[ids[2]], False]]
    assert second == [[["stand-in"], True], [[ids[3]], False]]
    assert [r["step"] for r in read_metrics(tmp_path / "runs" / "first")] == [1, 2]
    rejects = (tmp_path / "runs" / "first" / "rejects.rank1.jsonl").read_text()
    assert "missing_image" in rejects and entries[1]["image"] in rejects
