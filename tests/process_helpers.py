"""Which processes a test left behind: the lab's trainer children (`explorer.trainer_process`)."""

from __future__ import annotations

import os
from pathlib import Path


def trainers() -> list[int]:
    """The pids of this process's trainer children still running (/proc: parent, command)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:  # ended meanwhile
            continue
        # after the name: state, parent pid; a reaped child is gone, a zombie ("Z") has ended
        if int(fields[1]) == os.getpid() and fields[0] != "Z" and b"trainer_process" in cmdline:
            pids.append(int(stat.parent.name))
    return pids
