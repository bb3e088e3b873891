# FSDP2 on 2 CPU processes (gloo) trains exactly like 1 process on the same global batch.
from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from olavlm.config import resolve_config
from olavlm.train.metrics import read_metrics
from olavlm.train.parallel import free_port
from olavlm.train.trainer import Trainer

STEPS = 3
TIMING = ("time", "step_time_s", "samples_per_s", "tokens_per_s", "teachers/ms")


def _overrides(tmp, synth, batch, *extra):
    return [f"train.output_dir={tmp}", f"data.synthetic_dir={synth}", "data.synthetic_num=48",
            f"data.batch_size={batch}", f"train.max_steps={STEPS}", "checkpoint.every_steps=0",
            "checkpoint.at_end=false", "logging.progress=false", "logging.plot=false",
            "train.run_name=job", *extra]


def _trained_params(model):
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            out[name.replace("_fsdp_wrapped_module.", "")] = full.detach().clone()
    return out


def _worker(rank, world, port, tmp, synth, out_file, stage):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist

    trainer = Trainer(resolve_config("demo", None, _overrides(
        tmp, synth, 4, "parallel.fsdp=on", f"train.stage={stage}", "parallel.load=rank0")))
    assert trainer.loading.on_meta == (rank > 0)
    trainer.train()
    params = _trained_params(trainer.model)  # collective: every rank takes part
    if rank == 0:
        torch.save(params, out_file)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)



@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("stage", ["full", "pt"])  # pt: a frozen, sharded LLM
def test_two_process_fsdp_equals_one_process(tmp_path, stage):
    """With parallel.load=rank0 (rank 1 builds on the meta device and gets rank 0's weights)."""
    synth = tmp_path / "synthetic"
    single = Trainer(resolve_config("demo", None, _overrides(tmp_path / "one", synth, 8,
                                                             f"train.stage={stage}")))
    single.train()
    want = _trained_params(single.model)
    out_file = tmp_path / "fsdp.pt"
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path / "two"), str(synth), str(out_file),
                            stage), nprocs=2, join=True)
    got = torch.load(out_file)
    # Logged losses are global means (ranks' shares averaged): the same numbers as 1 process.
    one = read_metrics(single.run_dir)
    two = read_metrics(tmp_path / "two" / "job")
    for key in ("loss", "ntp", "gen", "depth", "seg"):
        assert two[0][key] == pytest.approx(one[0][key], rel=1e-5), key
    assert set(got) == set(want)
    # fp32 with reductions in another order: gradients agree to ~1e-7; Adam divides by
    # sqrt(v), so a near-zero gradient's update can move by a visible fraction of one step
    # (lr 1e-3): 2e-5 absolute is 2% of a step.
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=2e-5,
                                   msg=lambda m, n=name: f"{n}: {m}")


def _load_worker(rank, world, port, tmp, synth, out_file):
    """every_rank, then rank0 with a checkpoint at step 2, then a run resumed from it."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist

    results = {}
    for name, extra in (
            ("every_rank", ["parallel.load=every_rank"]),
            ("rank0", ["parallel.load=rank0", "checkpoint.every_steps=2"]),
            ("resumed", ["parallel.load=rank0", "checkpoint.resume="
                         f"{tmp}/rank0/job/checkpoints/step_000002"])):
        trainer = Trainer(resolve_config("demo", None, _overrides(
            f"{tmp}/{name}", synth, 4, "parallel.fsdp=on", *extra)))
        loading = [None] * world
        dist.all_gather_object(loading, (trainer.loading.on_meta, trainer.loading.llm_bytes))
        trainer.train()
        results[name] = {"params": _trained_params(trainer.model), "loading": loading}
    if rank == 0:
        torch.save(results, out_file)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


@pytest.mark.distributed
def test_rank0_load_trains_exactly_like_every_rank_and_resumes(tmp_path):
    synth, out_file = tmp_path / "synthetic", tmp_path / "results.pt"
    mp.spawn(_load_worker, args=(2, free_port(), str(tmp_path), str(synth), str(out_file)),
             nprocs=2, join=True)
    got = torch.load(out_file)
    # Rank 1 built the LLM on the meta device under rank0 (no LLM bytes before sharding).
    full = got["every_rank"]["loading"][0][1]
    assert full > 0 and got["every_rank"]["loading"] == [(False, full), (False, full)]
    assert got["rank0"]["loading"] == got["resumed"]["loading"] == [(False, full), (True, 0)]
    # Same weights and the same RNG state on every rank: the runs are identical bit for bit.
    every, rank0, resumed = ([{k: v for k, v in r.items() if k not in TIMING}
                              for r in read_metrics(tmp_path / n / "job")]
                             for n in ("every_rank", "rank0", "resumed"))
    assert len(every) == STEPS and rank0 == every
    assert resumed == every[-1:]
    for name, value in got["every_rank"]["params"].items():
        assert torch.equal(got["rank0"]["params"][name], value), name
        assert torch.equal(got["resumed"]["params"][name], value), name
