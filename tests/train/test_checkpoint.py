# Checkpointer: exact resume, atomic writes, keep-last, disk full, resume paths, stop signals.
from __future__ import annotations

import copy
import errno
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from olavlm.train import checkpoint as ckpt_mod
from olavlm.train.checkpoint import (
    MARKER,
    Checkpointer,
    CheckpointError,
    rng_state,
    set_rng_state,
)
from olavlm.train.signals import StopSignals

REPO = Path(__file__).resolve().parents[2]


class FakeLoader:
    """A loader stand-in: its state is a position that advances with each batch."""

    def __init__(self) -> None:
        self.epoch, self.position = 0, 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.position += 1
        # Data from the torch RNG: an exact continuation needs the RNG restored too.
        return torch.randn(5, 4), torch.randn(5, 3)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]


def _job(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return model, opt, sched, FakeLoader()


def _train(model, opt, sched, loader, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        x, y = loader.next_batch()
        noise = random.random() + float(np.random.rand())  # python + numpy RNG in the loss
        loss = ((model(x) - y) ** 2).mean() * (1 + 0.01 * noise)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def _state(model, opt, sched, loader, step):
    return {"model": model, "optim": opt, "scheduler": sched, "loader": loader, "rng": True,
            "extra": {"step": step, "note": "x"}}


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path):
    model, opt, sched, loader = _job()
    _train(model, opt, sched, loader, 3)
    ck = Checkpointer(tmp_path, keep_last=3)
    path = ck.save(3, _state(model, opt, sched, loader, 3))
    assert path == tmp_path / "checkpoints" / "step_000003" and ck.latest() == path
    saved_params = {k: v.clone() for k, v in model.state_dict().items()}
    saved_opt = copy.deepcopy(opt.state_dict())
    saved_sched = copy.deepcopy(sched.state_dict())
    want = _train(model, opt, sched, loader, 3)  # the uninterrupted run

    # A fresh process would build everything anew: another init, an empty optimizer state.
    model2, opt2, sched2, loader2 = _job(seed=1)
    random.random(), np.random.rand(), torch.rand(7)  # and have other RNG states
    extra = ck.load(path, _state(model2, opt2, sched2, loader2, 0))
    assert extra == {"step": 3, "note": "x"}
    for k, v in model2.state_dict().items():
        assert torch.equal(v, saved_params[k]), k
    got_opt = opt2.state_dict()
    assert got_opt["param_groups"] == saved_opt["param_groups"]
    for i, s in saved_opt["state"].items():
        for name, value in s.items():
            assert torch.equal(got_opt["state"][i][name], value), (i, name)
    assert sched2.state_dict() == saved_sched and loader2.state_dict() == {"epoch": 0,
                                                                           "position": 3}
    assert _train(model2, opt2, sched2, loader2, 3) == want  # bit-identical losses


class WithUnusedHead(nn.Module):
    """A head that gets no gradient in these steps (its task has no targets yet): AdamW keeps
    no state for it, and must have none after a resume either."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 3)
        self.unused = nn.Linear(3, 3)

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("steps_before_save", [0, 2])
def test_partial_and_empty_optimizer_state_resume_exactly(tmp_path, steps_before_save):
    def job(seed):
        torch.manual_seed(seed)
        model = WithUnusedHead()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s), \
            FakeLoader()

    model, opt, sched, loader = job(0)
    _train(model, opt, sched, loader, steps_before_save)
    ck = Checkpointer(tmp_path)
    ck.save(steps_before_save, _state(model, opt, sched, loader, steps_before_save))
    # Saving adds no state (DCP would initialize an empty optimizer with a zero-lr step).
    assert len(opt.state) == (0 if steps_before_save == 0 else 2)
    want = _train(model, opt, sched, loader, 3)
    model2, opt2, sched2, loader2 = job(1)
    ck.load(None, _state(model2, opt2, sched2, loader2, 0))
    assert len(opt2.state) == (0 if steps_before_save == 0 else 2)
    assert opt2.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5 ** steps_before_save)
    assert _train(model2, opt2, sched2, loader2, 3) == want


def test_rng_helpers_round_trip():
    state = rng_state()
    want = (random.random(), np.random.rand(), torch.rand(3))
    random.random(), np.random.randn(), torch.randn(5)
    set_rng_state(state)
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[:2] == want[:2] and torch.equal(got[2], want[2])


def test_keep_last_and_existing_step(tmp_path):
    model, opt, sched, loader = _job()
    ck = Checkpointer(tmp_path, keep_last=2)
    for step in range(1, 5):
        ck.save(step, {"model": model, "optim": opt, "extra": {"step": step}})
    assert [p.name for p in ck.checkpoints()] == ["step_000003", "step_000004"]
    # Saving a step that is already complete returns it untouched.
    mtime = (ck.latest() / MARKER).stat().st_mtime_ns
    assert ck.save(4, {"model": model}) == ck.latest()
    assert (ck.latest() / MARKER).stat().st_mtime_ns == mtime
    keep_all = Checkpointer(tmp_path / "all", keep_last=0)
    for step in range(1, 4):
        keep_all.save(step, {"extra": {"step": step}})
    assert len(keep_all.checkpoints()) == 3
    info = json.loads((keep_all.latest() / MARKER).read_text())
    assert info["step"] == 3 and info["world_size"] == 1 and "rank_00000.pt" in info["files"]


def test_a_branched_run_supersedes_the_abandoned_timeline(tmp_path):
    """A run resumed from an earlier checkpoint (after a loss spike, with a lower lr) writes
    its own checkpoints at steps the first run had already saved: those, and every later one,
    are moved aside (kept, never pruned), so resume=auto and export find the new timeline."""
    model, opt, _, _ = _job()
    first = Checkpointer(tmp_path, keep_last=0)
    for step in range(1, 5):
        first.save(step, {"model": model, "extra": {"step": step, "run": "first"}})
    branch = Checkpointer(tmp_path, keep_last=2)  # a new process resuming from step 2
    assert branch.load(branch.dir / "step_000002", {"model": model})["run"] == "first"
    assert branch.save(2, {"model": model, "extra": {"step": 2, "run": "branch"}}) \
        == branch.dir / "step_000002"  # the checkpoint it resumed from: its own, kept
    with pytest.warns(UserWarning, match="branched off"):
        branch.save(3, {"model": model, "extra": {"step": 3, "run": "branch"}})
    assert [p.name for p in branch.checkpoints()] == ["step_000002", "step_000003"]
    assert branch.resolve_resume("auto") == branch.dir / "step_000003"
    assert branch.load(None, {"model": model}) == {"step": 3, "run": "branch"}
    aside = sorted(p.name.rsplit("-", 1)[0] for p in branch.dir.glob("superseded-*"))
    assert aside == ["superseded-step_000003", "superseded-step_000004"]
    # This run's own checkpoint of a step is never rewritten (a stop signal right after a save).
    mtime = (branch.latest() / MARKER).stat().st_mtime_ns
    branch.save(3, {"model": model, "extra": {"step": 3}})
    assert (branch.latest() / MARKER).stat().st_mtime_ns == mtime
    # keep_last prunes checkpoints, never the superseded ones
    for step in range(4, 7):
        branch.save(step, {"model": model, "extra": {"step": step}})
    assert [p.name for p in branch.checkpoints()] == ["step_000005", "step_000006"]
    assert len(list(branch.dir.glob("superseded-*"))) == 2


def test_a_branched_run_crashing_right_after_its_first_rename_resumes_its_own_timeline(
        tmp_path, monkeypatch):
    """The abandoned timeline's later checkpoints are moved aside before the branch's first
    checkpoint is renamed into place: a crash right after that rename (before any cleanup)
    must not leave them for resume=auto to pick over the branch's new one."""
    model, _, _, _ = _job()
    first = Checkpointer(tmp_path, keep_last=0)
    for step in range(1, 5):
        first.save(step, {"model": model, "extra": {"step": step, "run": "first"}})
    branch = Checkpointer(tmp_path, keep_last=0)
    branch.load(branch.dir / "step_000002", {"model": model})
    publish = Checkpointer._publish

    def crash_after_rename(self, *args, **kwargs):
        publish(self, *args, **kwargs)
        raise KeyboardInterrupt  # the process dies right after the rename

    monkeypatch.setattr(Checkpointer, "_publish", crash_after_rename)
    with pytest.raises(KeyboardInterrupt), pytest.warns(UserWarning, match="branched off"):
        branch.save(3, {"model": model, "extra": {"step": 3, "run": "branch"}})
    again = Checkpointer(tmp_path)  # the rerun, resume=auto
    assert again.resolve_resume("auto") == again.dir / "step_000003"
    assert again.load(None, {"model": model}) == {"step": 3, "run": "branch"}


def test_a_crash_between_write_and_rename_never_becomes_latest(tmp_path):
    """A real kill (SIGKILL) right before the rename: the temp dir, even with its marker
    written, is never taken for a checkpoint, and the next save removes it."""
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(REPO)!r})
        import torch
        from olavlm.train.checkpoint import Checkpointer
        ck = Checkpointer({str(tmp_path)!r})
        model = torch.nn.Linear(3, 3)
        ck.save(1, {{"model": model, "extra": {{"step": 1}}}})
        os.replace = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
        ck.save(2, {{"model": model, "extra": {{"step": 2}}}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    ck = Checkpointer(tmp_path)
    leftovers = list(ck.dir.glob(".tmp-step_000002-*"))
    assert len(leftovers) == 1 and (leftovers[0] / MARKER).exists()
    assert ck.latest() == ck.dir / "step_000001"
    assert ck.resolve_resume("auto") == ck.dir / "step_000001"
    assert ck.load(None, {"model": nn.Linear(3, 3)}) == {"step": 1}
    ck.save(3, {"model": nn.Linear(3, 3)})
    assert not list(ck.dir.glob(".tmp-*"))


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _enospc_as_torch_save_reports_it(*args, **kwargs):
    # A real full disk inside DCP's writer: torch.save's stream fails with a RuntimeError
    # ("unexpected pos ...") whose __context__ (implicit chaining) is the ENOSPC OSError.
    try:
        _enospc()
    except OSError:  # the implicit __context__ is the point: no "from"
        raise RuntimeError("[enforce fail] unexpected pos 704 vs 598")  # noqa: B904


@pytest.mark.parametrize("where", ["rank_file", "dcp", "dcp_wrapped", "marker"])
def test_disk_full_keeps_the_previous_checkpoint(tmp_path, monkeypatch, where):
    model, opt, sched, loader = _job()
    ck = Checkpointer(tmp_path, keep_last=1)
    ck.save(1, _state(model, opt, sched, loader, 1))
    before = {p.name: p.stat().st_size for p in (ck.dir / "step_000001").iterdir()}
    if where == "rank_file":
        monkeypatch.setattr(ckpt_mod, "_write_rank_file", _enospc)
    elif where.startswith("dcp"):  # inside DCP's writer: it arrives in a CheckpointException
        from torch.distributed.checkpoint import filesystem
        monkeypatch.setattr(filesystem.FileSystem, "create_stream",
                            _enospc if where == "dcp" else _enospc_as_torch_save_reports_it)
    else:  # the last write before the rename
        write = ckpt_mod._fsync_write
        monkeypatch.setattr(ckpt_mod, "_fsync_write", lambda path, data: _enospc() if
                            path.name == MARKER else write(path, data))
    with pytest.raises(CheckpointError, match=r"No space left on device.*previous checkpoint "
                       r"step_000001 .* is intact"):
        ck.save(2, _state(model, opt, sched, loader, 2))
    assert [p.name for p in ck.dir.iterdir()] == ["step_000001"]  # no temp dir left
    assert {p.name: p.stat().st_size for p in (ck.dir / "step_000001").iterdir()} == before
    assert ck.latest() == ck.dir / "step_000001"


def test_disk_full_without_previous_checkpoint_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt_mod, "_write_rank_file", _enospc)
    with pytest.raises(CheckpointError, match="no previous checkpoint"):
        Checkpointer(tmp_path).save(1, {"extra": {}})


def test_programming_errors_propagate_and_clean_up(tmp_path):
    class Bad(FakeLoader):
        def state_dict(self):
            return {"fn": lambda: 0}  # not picklable

    ck = Checkpointer(tmp_path)
    with pytest.raises(Exception, match="lambda|pickle"):
        ck.save(1, {"loader": Bad()})
    assert not list(ck.dir.iterdir())
    with pytest.raises(ValueError, match="unknown keys.*'optimizer'"):
        ck.save(1, {"optimizer": None})
    with pytest.raises(TypeError, match="JSON"):
        ck.save(1, {"extra": {"x": object()}})


def test_resolve_resume_variants_and_bad_paths(tmp_path):
    ck = Checkpointer(tmp_path)
    assert ck.resolve_resume("none") is None and ck.resolve_resume("auto") is None
    model = nn.Linear(2, 2)
    ck.save(5, {"model": model, "scheduler": None, "extra": {"step": 5}})
    good = ck.dir / "step_000005"
    assert ck.resolve_resume("auto") == good and ck.resolve_resume(str(good)) == good
    with pytest.raises(CheckpointError, match=r"nope.*no such directory"):
        ck.resolve_resume(str(tmp_path / "nope"))
    with pytest.raises(CheckpointError, match="this is a run directory: to continue it in place"):
        ck.resolve_resume(str(tmp_path))
    half = ck.dir / "step_000009"
    half.mkdir()
    with pytest.raises(CheckpointError, match=r"step_000009.*COMPLETE marker is missing"):
        ck.resolve_resume(str(half))
    assert ck.latest() == good  # the unmarked directory is not a checkpoint
    (good / "rank_00000.pt").unlink()
    with pytest.raises(CheckpointError, match=r"step_000005.*missing: rank_00000\.pt"):
        ck.resolve_resume(str(good))
    assert ck.latest() is None


def test_load_names_missing_components(tmp_path):
    ck = Checkpointer(tmp_path)
    ck.save(1, {"extra": {"step": 1}})
    model, opt, sched, loader = _job()
    with pytest.raises(CheckpointError, match="no 'scheduler' state"):
        ck.load(None, {"scheduler": sched})
    with pytest.raises(CheckpointError, match="no model state"):
        ck.load(None, {"model": model})
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        Checkpointer(tmp_path / "empty").load(None, {})


def _wait_for(predicate, seconds=2.0):
    deadline = time.monotonic() + seconds
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.005)
    return predicate()


def test_stop_signals_set_a_flag_and_restore_handlers(sigint_default):
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with StopSignals() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert _wait_for(lambda: stop.requested)  # and this process is still alive
        assert stop.signal_name == "SIGTERM"
        os.kill(os.getpid(), signal.SIGTERM)  # a repeated SIGTERM keeps the request
        assert _wait_for(lambda: stop.count == 2)
    assert {s: signal.getsignal(s) for s in before} == before


@pytest.fixture
def sigint_default():
    """Python's own SIGINT handler for the test: a suite started in the background inherits
    SIGINT ignored, which StopSignals rightly leaves alone."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_second_sigint_stops_at_once(sigint_default):
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt), StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert _wait_for(lambda: stop.requested) and stop.signal_name == "SIGINT"
        os.kill(os.getpid(), signal.SIGINT)
        _wait_for(lambda: False, 2.0)  # interrupted by the second Ctrl-C
    assert signal.getsignal(signal.SIGINT) is before


def test_stop_signals_respects_ignored_signals_and_other_threads():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with StopSignals():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
    caught = []

    def in_thread():
        with pytest.warns(UserWarning, match="main thread"), StopSignals() as stop:
            caught.append(stop.requested)

    t = threading.Thread(target=in_thread)
    t.start()
    t.join()
    assert caught == [False]


# ---- FSDP2 on 2 CPU processes (gloo) ----------------------------------------------------------

WORLD = 2


def _sharded_job():
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.GELU(), nn.Linear(10, 4))
    fully_shard(model[0])
    fully_shard(model[2])
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt


def _sharded_step(model, opt, rank):
    g = torch.Generator().manual_seed(100 + rank)
    loss = model(torch.randn(3, 6, generator=g)).square().mean()
    loss.backward()
    opt.step()
    opt.zero_grad()


def _full(model, opt):
    params = {n: p.full_tensor().clone() for n, p in model.named_parameters()}
    state = {}
    for i, s in enumerate(opt.state.values()):
        for k, v in s.items():
            v = v.full_tensor() if hasattr(v, "full_tensor") else v
            state[f"{i}.{k}"] = v.clone()
    return params, state


def _fsdp_worker(rank, init_file, run_dir, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        model, opt = _sharded_job()
        _sharded_step(model, opt, rank)
        ck = Checkpointer(run_dir)
        ck.save(1, {"model": model, "optim": opt, "rng": True, "extra": {"rank": rank}})
        want = _full(model, opt)
        draw = torch.rand(4)
        _sharded_step(model, opt, rank)  # move away from the checkpoint
        extra = ck.load(ck.latest(), {"model": model, "optim": opt, "rng": True,
                                      "extra": None})
        got = _full(model, opt)
        torch.save({"want": want, "got": got, "extra": extra, "draws": (draw, torch.rand(4))},
                   os.path.join(out_dir, f"{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    os._exit(0)


@pytest.mark.distributed
def test_fsdp2_sharded_save_and_load_on_two_processes(tmp_path):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_fsdp_worker, args=(os.path.join(tmp, "init"), str(tmp_path), tmp),
                 nprocs=WORLD, join=True)
        results = [torch.load(os.path.join(tmp, f"{r}.pt")) for r in range(WORLD)]
    for rank, res in enumerate(results):
        assert res["extra"] == {"rank": rank}  # per-rank state comes back to its rank
        for part in (0, 1):
            assert res["got"][part].keys() == res["want"][part].keys()
            for k, v in res["want"][part].items():
                assert torch.equal(res["got"][part][k], v), (rank, k)
        assert torch.equal(*res["draws"])
    ck = Checkpointer(tmp_path)
    info = json.loads((ck.latest() / MARKER).read_text())
    assert info["world_size"] == 2 and {"rank_00000.pt", "rank_00001.pt"} <= set(info["files"])
    # One process reads the sharded checkpoint into an unsharded model (resharding).
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 10), nn.GELU(), nn.Linear(10, 4))
    with warnings.catch_warnings():  # the model alone (an export): nothing to warn about
        warnings.simplefilter("error")
        ck.load(None, {"model": model})
    with pytest.warns(UserWarning, match="written by 2 ranks.*RNG"):  # a continuation is
        ck.load(None, {"model": copy.deepcopy(model), "rng": True})  # not bit-exact
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), results[0]["want"][0][n]), n


def test_a_damaged_checkpoint_names_the_one_before_it(tmp_path):
    """Bytes flipped inside the newest rank file (size unchanged, so it still looks complete):
    the error says the file is damaged and names the complete checkpoint before it, without
    torch's advice to load with weights_only=False (which would run the damaged pickle)."""
    model, opt, sched, loader = _job()
    ck = Checkpointer(tmp_path, keep_last=0)
    for step in (2, 4):
        ck.save(step, _state(model, opt, sched, loader, step))
    f = ck.latest() / "rank_00000.pt"
    data = bytearray(f.read_bytes())
    data[40:200] = bytes(b ^ 0x5A for b in data[40:200])
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as exc:
        ck.load(None, _state(*_job(), 0))
    msg = str(exc.value)
    assert "damaged" in msg and "weights_only" not in msg
    assert f"--resume {tmp_path / 'checkpoints' / 'step_000002'}" in msg
    (tmp_path / "checkpoints" / "step_000002" / "rank_00000.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="no earlier checkpoint"):
        ck.load(tmp_path / "checkpoints" / "step_000002", _state(*_job(), 0))
