"""Benchmarks behind `distpose bench ...`; each returns a JSON-ready dict naming the machine."""

from __future__ import annotations

import os
import platform

import torch


def machine() -> dict[str, object]:
    """What a figure was measured on."""
    info: dict[str, object] = {
        "host_cpu": platform.processor() or platform.machine(),
        "cpu_cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
    else:
        info["device"] = "cpu"
    return info
