"""What machine a benchmark ran on, printed the same way by every benchmark."""

from __future__ import annotations

import contextlib
import os
import platform


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (``platform.processor()`` only says "x86_64")."""
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def describe() -> str:
    """E.g. "Intel(R) Xeon(R) Processor (2 logical CPUs)"."""
    return f"{cpu_name()} ({os.cpu_count()} logical CPUs)"
