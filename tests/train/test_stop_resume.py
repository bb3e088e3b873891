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
