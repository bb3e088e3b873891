# SIGTERM/SIGINT as a request to stop after the current step (the trainer then checkpoints).
from __future__ import annotations

import logging
import signal
import threading
import warnings
from typing import Any

__all__ = ["StopSignals"]

logger = logging.getLogger(__name__)


class StopSignals:
    """Turns SIGTERM/SIGINT into a request to stop at the end of the current step.

    Inside the ``with`` block a signal sets ``requested`` (and ``signal_name``, e.g.
    "SIGTERM") instead of ending the process; the loop checks the flag after each step, writes
    a checkpoint and exits. A second SIGINT (Ctrl-C twice) restores the default handler and
    raises KeyboardInterrupt at once. Signals ignored on entry (SIG_IGN, e.g. SIGINT of a
    background job) stay ignored. The previous handlers come back on exit. Handlers can only
    be installed from the main thread; elsewhere the block warns once and never sets the flag.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self.signals = tuple(signals)
        self.requested = False
        self.signal_name: str | None = None
        self.count = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            warnings.warn("StopSignals: not in the main thread; SIGTERM/SIGINT keep their "
                          "default behaviour (no checkpoint on stop)", stacklevel=2)
            return self
        for sig in self.signals:
            previous = signal.getsignal(sig)
            if previous is signal.SIG_IGN:
                continue
            self._previous[sig] = previous
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        self.count += 1
        if self.requested and signum == signal.SIGINT:
            # (the caller's handler stays in _previous: __exit__ puts it back, not this one)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt(f"second {name}: stopping now")
        if not self.requested:
            logger.warning("%s received: finishing the current step, writing a checkpoint, "
                           "then stopping (Ctrl-C again stops at once)", name)
        self.requested = True
        self.signal_name = self.signal_name or name

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

