# The bad-sample policy: every rejected or truncated sample is counted, logged and summarized.
"""Bad data: what is rejected, how it is reported, and the ``on_bad_sample`` policy.

Reasons (``REJECT_REASONS``):
- ``malformed_json``: a ``.jsonl`` line that does not parse (found while indexing; the id is
  ``file:line``);
- ``no_conversations``: an entry without a non-empty ``conversations`` list;
- ``bad_entry``: any other malformed entry (not an object, a turn without a str ``value``,
  an unknown ``from``, roles that do not alternate, several images, ``plain`` with more turns);
- ``missing_image`` / ``corrupt_image``: the image file is absent / cannot be decoded;
- ``unreadable_image``: reading the file failed (an ``OSError`` that is not about the
  image's content: ``PermissionError``, a disk's ``EIO``, a network file system's ``ESTALE``),
  after ``images.READ_ATTEMPTS`` tries for a transient errno; the detail names the errno;
- ``bad_maps``: the synthetic dataset's depth or segmentation map of the image (read for the
  synthetic teacher run online) is absent or unreadable;
- ``tokenization_mismatch``: no token ends an assistant header (templates.py);
- ``too_long``: ``max_length`` cannot even hold the prompt before the image and the image.

Image samples whose cached targets are absent, damaged, or were computed from an earlier
version of the image file (``missing_target``, ``corrupt_target``, ``stale_target``,
``TARGET_PROBLEMS``) are not rejected: they train on the text with the embedding losses
masked, and are counted apart, logged in the rejects file and summarized.

``on_bad_sample="skip"`` (default) leaves the sample out of its batch, counts it per reason,
appends one JSON line per reject to the rejects file and logs a summary at the end of the
epoch; ``"raise"`` raises ``BadSampleError`` at the first one. Conversations longer than
``max_length`` are not rejected: they are truncated and counted (``truncated``).
"""
from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter
from pathlib import Path

__all__ = [
    "BAD_SAMPLE_POLICIES",
    "REJECT_REASONS",
    "TARGET_PROBLEMS",
    "BadSampleError",
    "Reject",
    "RejectLog",
    "check_policy",
]

logger = logging.getLogger("olavlm.data")

BAD_SAMPLE_POLICIES = ("skip", "raise")
REJECT_REASONS = (
    "malformed_json", "no_conversations", "bad_entry", "missing_image", "unreadable_image",
    "corrupt_image", "bad_maps", "tokenization_mismatch", "too_long",
)
TARGET_PROBLEMS = ("missing_target", "corrupt_target", "stale_target")


def check_policy(on_bad_sample: str) -> str:
    if on_bad_sample not in BAD_SAMPLE_POLICIES:
        raise ValueError(f"on_bad_sample must be one of {BAD_SAMPLE_POLICIES}, "
                         f"got {on_bad_sample!r}")
    return on_bad_sample


@dataclasses.dataclass(frozen=True)
class Reject:
    """One rejected sample. ``index`` is its dataset index (None when it never got one, e.g.
    a malformed line); ``location`` is ``file:line`` (jsonl) or ``file[#k]`` (json)."""

    reason: str
    sample_id: str
    location: str
    detail: str
    index: int | None = None

    def message(self) -> str:
        return f"{self.location}: sample {self.sample_id!r}: {self.reason}: {self.detail}"


class BadSampleError(ValueError):
    """Raised for a bad sample under ``on_bad_sample="raise"``; ``.reject`` has the details."""

    def __init__(self, reject: Reject | str):
        # A str form lets DataLoader workers re-raise it in the main process (it rebuilds
        # exceptions from their message).
        if isinstance(reject, Reject):
            self.reject = reject
            super().__init__(reject.message())
        else:
            self.reject = None
            super().__init__(reject)


def truncate_rejects_file(path: Path, size: int) -> None:
    """Cut ``path`` back to ``size`` bytes if it is longer, only at a line's end (never half a
    record: a state from another run's file of another length leaves it alone)."""
    if path.is_file() and path.stat().st_size > size:
        with path.open("r+b") as f:
            if size > 0:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    return
            f.truncate(size)


FIRST_KEPT = 5  # rejects kept in memory per epoch (the file has them all)


class RejectLog:
    """Counts rejects and truncations, appends rejects to a JSON-lines file, summarizes.

    Only the main process writes (workers send their rejects back inside the batch), so the
    file needs no locking. ``state_dict`` carries the counts of the running epoch.
    """

    def __init__(self, path: str | Path | None = None):
        self.path = None if path is None else Path(path)
        self.counts: Counter[str] = Counter()
        self.num_truncated = 0
        # used samples without a next-token label (an empty answer, or a prompt that filled
        # max_length): only their embedding losses train; counted, not rejected
        self.num_unlabelled = 0
        self.num_samples = 0
        self.num_dropped = 0  # left out by batching (drop_last, fewer samples than ranks)
        self.target_counts: Counter[str] = Counter()  # samples trained without targets
        self.first: list[Reject] = []  # the epoch's first FIRST_KEPT rejects, for messages

    def add(self, reject: Reject, *, epoch: int | None = None) -> None:
        """Count ``reject`` and append it to the rejects file."""
        self.counts[reject.reason] += 1
        if len(self.first) < FIRST_KEPT:
            self.first.append(reject)
        self.write(reject, epoch=epoch)

    def add_target_problem(self, problem: Reject, *, epoch: int | None = None) -> None:
        """Count an image sample trained without its targets (masked) and log it."""
        self.target_counts[problem.reason] += 1
        self.write(problem, epoch=epoch)

    @property
    def num_target_problems(self) -> int:
        return sum(self.target_counts.values())

    def write(self, reject: Reject, *, epoch: int | None = None) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = dataclasses.asdict(reject) | {"epoch": epoch}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=True) + "\n")

    def file_state(self) -> dict | None:
        """Where the rejects file stands (its name and size), for a checkpoint: a resume
        rewinds the file to it (``rewind_file``), so the steps it redoes do not list their
        rejects a second time."""
        if self.path is None:
            return None
        size = self.path.stat().st_size if self.path.is_file() else 0
        return {"name": self.path.name, "bytes": size}

    def rewind_file(self, state: dict | None) -> None:
        """Cut the rejects file back to ``file_state()``'s size: the lines after it were written
        by steps after the checkpoint, which the resumed run redoes (and logs again). Another
        rank's file (the world size changed) or a file shorter than recorded is left alone."""
        if self.path is None or not state or state.get("name") != self.path.name:
            return
        truncate_rejects_file(self.path, int(state.get("bytes", 0)))

    def rewind_files(self, states) -> None:
        """``rewind_file`` for every rank's file of a checkpoint (``file_state()``s, named in
        this log's folder): after a change of the number of ranks the redone steps' rejects
        go to files of other names, so the old ones are cut back here (by rank 0)."""
        if self.path is None:
            return
        for state in states or ():
            if state and state.get("name"):
                truncate_rejects_file(self.path.parent / Path(state["name"]).name,
                                      int(state.get("bytes", 0)))

    @property
    def num_rejected(self) -> int:
        return sum(self.counts.values())

    def summary(self, epoch: int | None = None) -> str:
        head = f"epoch {epoch}: " if epoch is not None else ""
        parts = ", ".join(f"{reason}={n}" for reason, n in sorted(self.counts.items()))
        where = f" (ids in {self.path})" if self.path is not None and self.counts else ""
        targets = ""
        if self.target_counts:
            listed = ", ".join(f"{r}={n}" for r, n in sorted(self.target_counts.items()))
            targets = (f", {self.num_target_problems} without targets (masked) [{listed}]")
        unlabelled = (f" ({self.num_unlabelled} without a next-token label)"
                      if self.num_unlabelled else "")
        return (f"{head}{self.num_samples} samples used{unlabelled}, {self.num_rejected} "
                f"rejected{' [' + parts + ']' if parts else ''}{where}, {self.num_truncated} "
                f"truncated, {self.num_dropped} dropped by batching{targets}")

    def reset(self) -> None:
        self.counts.clear()
        self.first = []
        self.num_truncated = 0
        self.num_unlabelled = 0
        self.num_samples = 0
        self.num_dropped = 0
        self.target_counts.clear()

    def state_dict(self) -> dict:
        return {"counts": dict(self.counts), "num_truncated": self.num_truncated,
                "num_unlabelled": self.num_unlabelled,
                "num_samples": self.num_samples, "num_dropped": self.num_dropped,
                "target_counts": dict(self.target_counts)}

    @classmethod
    def merged(cls, states: list[dict], *, shared: Counter | None = None,
               path: str | Path | None = None) -> RejectLog:
        """One log of several ranks' ``state_dict()``s, summed; ``shared``: reject counts every
        rank holds once (the index's rejects, counted in each rank's epoch), kept once."""
        log = cls(path)
        for state in states:
            part = cls()
            part.load_state_dict(state)
            log.counts.update(part.counts)
            log.target_counts.update(part.target_counts)
            log.num_truncated += part.num_truncated
            log.num_unlabelled += part.num_unlabelled
            log.num_samples += part.num_samples
            log.num_dropped += part.num_dropped
        for reason, n in (shared or {}).items():
            log.counts[reason] -= n * (len(states) - 1)
        log.counts = +log.counts  # (drop zero counts)
        return log

    def load_state_dict(self, state: dict) -> None:
        self.counts = Counter(state.get("counts", {}))
        self.num_truncated = int(state.get("num_truncated", 0))
        self.num_unlabelled = int(state.get("num_unlabelled", 0))  # (absent before: 0)
        self.num_samples = int(state.get("num_samples", 0))
        self.num_dropped = int(state.get("num_dropped", 0))
        self.target_counts = Counter(state.get("target_counts", {}))
