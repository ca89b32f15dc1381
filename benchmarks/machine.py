"""What every benchmark records beside its figures: the CPU and how busy it was.

Scripts in this folder import it as ``from machine import ...`` (a script's own folder
is first on ``sys.path``).
"""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path


def load_average() -> list[float]:
    """The 1/5/15-minute load averages: these machines are shared, so every run keeps them."""
    return [round(x, 2) for x in os.getloadavg()]


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"
