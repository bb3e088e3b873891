# Small file-system helpers shared by the writers: who wrote a temporary, and is it still alive.
"""Temporary names carry ``<host>-<pid>`` so a later process can tell a leftover of a killed
writer (same host, no such process) from one still being written (a live process, or another
host's, which cannot be checked from here)."""
from __future__ import annotations

import os
import re
import socket


def host_tag() -> str:
    """This host's name as a temporary-name part: letters, digits and ``_`` only."""
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:40] or "host"


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host runs (someone else's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def dead_writer(tag: str) -> bool:
    """For a temporary's ``<host>-<pid>`` tag (or a bare ``<pid>`` of older versions): its
    writer was a process of this host that no longer runs."""
    host, _, pid = tag.rpartition("-")
    if not pid.isdigit() or (host and host != host_tag()):
        return False
    return not process_alive(int(pid))
