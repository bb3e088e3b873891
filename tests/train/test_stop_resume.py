# Stopping and resuming: the signal handlers' bookkeeping, a stop that lands on the last step.
from __future__ import annotations

import os
import signal
import time

import pytest

from olavlm.config import resolve_config
from olavlm.train.signals import StopSignals
from olavlm.train.trainer import Trainer


def _wait_for(predicate, seconds=5.0):
    deadline = time.monotonic() + seconds
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.005)
    return predicate()


def test_a_second_sigint_gives_back_the_callers_handler():
    """The docstring's "the previous handlers come back on exit" holds after a second Ctrl-C
    too: the caller's own SIGINT handler (a notebook kernel's, an application's), not Python's
    default one, is installed again when the block is left."""
    seen = []

    def callers(signum, frame):
        seen.append(signum)

    previous = signal.signal(signal.SIGINT, callers)
    try:
        with pytest.raises(KeyboardInterrupt), StopSignals() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            assert _wait_for(lambda: stop.requested)
            os.kill(os.getpid(), signal.SIGINT)
            _wait_for(lambda: False, 2.0)  # interrupted by the second Ctrl-C
        assert signal.getsignal(signal.SIGINT) is callers
        os.kill(os.getpid(), signal.SIGINT)
        assert _wait_for(lambda: seen == [signal.SIGINT])
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("synthetic")


def test_a_stop_signal_during_the_last_step_finishes_the_run(tmp_path, synth_dir):
    """SIGTERM while the last step runs (a scheduler's time limit at the very end): the run
    has trained every step, so it ends as finished (final checkpoint, FINISHED marker), not
    as a stopped run that asks to be rerun and that checkpoint.init_from warns about."""
    cfg = resolve_config("demo", None, [
        f"train.output_dir={tmp_path / 'runs'}", f"data.synthetic_dir={synth_dir}",
        "data.synthetic_num=16", "logging.progress=false", "logging.plot=false",
        "train.max_steps=3", "checkpoint.every_steps=0", "train.run_name=last"])
    trainer = Trainer(cfg)
    micro_step = trainer._micro_step

    def signalled_in_the_last_step(*args, **kwargs):
        if trainer.step + 1 == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return micro_step(*args, **kwargs)

    trainer._micro_step = signalled_in_the_last_step
    try:
        result = trainer.train()
    finally:
        trainer.close()
    assert result.steps == 3 and result.stopped is None
    assert (trainer.run_dir / "FINISHED").read_text().strip() == "3"
    assert trainer.checkpointer.latest().name == "step_000003"


# ---- real processes: torchrun, 2 gloo ranks, FSDP2 -------------------------------------------

_WRAPPER = '''
import os, signal, sys
import olavlm.train.checkpoint as C
import olavlm.train.trainer as T
from olavlm.train.cli import main

kind, rank, step = os.environ.get("FAULT", "none:-1:-1").split(":")
mine = os.environ["RANK"] == rank
micro_step, write_dcp = T.Trainer._micro_step, C._write_dcp

def _micro_step(self, *args, **kwargs):  # SIGTERM to this rank alone, during a step
    if kind == "sigterm" and mine and self.step + 1 == int(step):
        os.kill(os.getpid(), signal.SIGTERM)
    return micro_step(self, *args, **kwargs)

def _write_dcp(path, *args, **kwargs):  # SIGKILL after this rank's shards, before the marker
    write_dcp(path, *args, **kwargs)
    if kind == "sigkill" and mine and path.name.startswith(f".tmp-step_{int(step):06d}-"):
        os.kill(os.getpid(), signal.SIGKILL)

T.Trainer._micro_step, C._write_dcp = _micro_step, _write_dcp
sys.exit(main(sys.argv[1:]))
'''


def _torchrun(tmp_path, name, fault="none:-1:-1"):
    import subprocess
    import sys
    from pathlib import Path

    wrapper = tmp_path / "fault_wrapper.py"
    wrapper.write_text(_WRAPPER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", str(wrapper), f"train.output_dir={tmp_path / 'runs'}",
           f"data.synthetic_dir={tmp_path / 'synth'}", "data.synthetic_num=24",
           "logging.progress=false", "logging.plot=false", f"train.run_name={name}",
           "train.max_steps=6", "data.batch_size=2", "parallel.fsdp=on",
           "checkpoint.every_steps=2", "--resume", "auto"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", FAULT=fault)
    return subprocess.run(cmd, cwd=Path(__file__).resolve().parents[2], capture_output=True,
                          text=True, timeout=150, env=env)


@pytest.mark.distributed
@pytest.mark.slow
def test_torchrun_sigterm_to_one_rank_then_sigkill_mid_checkpoint_resumes_exactly(tmp_path):
    """FSDP2 on 2 gloo ranks. SIGTERM to rank 1 alone during step 3: both ranks stop after it
    with a checkpoint, exit 0. The rerun's rank 1 is SIGKILLed after writing its shards of
    step 4's checkpoint: --resume auto then takes step 3, never the half-written step 4, and
    the losses of every step equal an uninterrupted run's bit for bit."""
    from olavlm.train.checkpoint import latest_checkpoint
    from olavlm.train.metrics import read_metrics

    ref = _torchrun(tmp_path, "ref")
    assert ref.returncode == 0, ref.stderr[-3000:]
    want = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "runs" / "ref")}
    assert sorted(want) == [1, 2, 3, 4, 5, 6]
    run = tmp_path / "runs" / "job"

    stopped = _torchrun(tmp_path, "job", "sigterm:1:3")
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert "stopped by SIGTERM at step 3" in stopped.stdout
    assert "stopped by a signal on another rank at step 3" in stopped.stdout
    assert latest_checkpoint(run).name == "step_000003"
    assert not (run / "FINISHED").exists()

    killed = _torchrun(tmp_path, "job", "sigkill:1:4")
    assert killed.returncode != 0 and "exitcode  : -9" in killed.stderr, killed.stderr[-3000:]
    assert list((run / "checkpoints").glob(".tmp-step_000004-*"))  # the half-written one
    assert latest_checkpoint(run).name == "step_000003"

    resumed = _torchrun(tmp_path, "job")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "step_000003 at step 3" in resumed.stderr
    assert (run / "FINISHED").read_text().strip() == "6"
    got = {r["step"]: r["loss"] for r in read_metrics(run)}  # (the last of each step)
    assert got == want
