"""Describe the machine a benchmark ran on, so every results file says where its numbers come from.

Import it from a benchmark script (``benchmarks/`` is the script's own directory, so a plain
``import _machine`` works) and put :func:`markdown` at the top of the results file::

    import _machine
    lines = [_machine.markdown(), ...]

Run it directly to print the same block: ``python benchmarks/_machine.py``.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _ram_gib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (AttributeError, ValueError, OSError):
        return None


def load_average() -> str | None:
    """The 1, 5 and 15 minute load averages ("0.12 / 0.30 / 0.25"): a busy machine makes slow numbers."""
    try:
        return " / ".join(f"{v:.2f}" for v in os.getloadavg())
    except (AttributeError, OSError):
        return None


def machine_info() -> dict[str, object]:
    """CPU model, usable cores, RAM, library versions, CUDA device (or None) and the date (UTC)."""
    import numpy
    import torch

    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    ram = _ram_gib()
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_model(),
        "cores": _usable_cores(),
        "torch_threads": torch.get_num_threads(),
        "ram_gib": None if ram is None else round(ram, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "cuda_device": cuda,
        "cuda_version": torch.version.cuda if cuda else None,
        "load_average": load_average(),
    }


def markdown(info: dict[str, object] | None = None) -> str:
    """The machine as a short markdown bullet list."""
    info = machine_info() if info is None else info
    ram = "unknown" if info["ram_gib"] is None else f"{info['ram_gib']} GiB"
    gpu = (
        f"{info['cuda_device']} (CUDA {info['cuda_version']})"
        if info["cuda_device"]
        else "none (torch.cuda.is_available() is False)"
    )
    return "\n".join(
        [
            f"- Date: {info['date']}",
            f"- CPU: {info['cpu']}, {info['cores']} usable cores, torch threads {info['torch_threads']}, RAM {ram}",
            f"- GPU: {gpu}",
            f"- Python {info['python']}, torch {info['torch']}, numpy {info['numpy']}",
        ]
    )


if __name__ == "__main__":
    print(markdown())
