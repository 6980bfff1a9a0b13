"""Measuring helpers shared by the benchmark scripts.

The scripts run as ``python benchmarks/NAME.py``, so this folder is on
``sys.path`` and they import this file as ``_measure``. CPU peak memory is
read from Linux's ``/proc/self/status``: VmHWM (the resident high-water mark)
can be reset to the current RSS by writing 5 to ``/proc/self/clear_refs``,
which lets one process measure several phases one after another.
"""

from __future__ import annotations

import platform
import sys
from typing import Optional

import torch


def import_comfyui(path: str, cpu: bool) -> None:
    """Make the ComfyUI checkout at ``path`` importable in this process, as a script (not its server) uses it: no
    command-line parsing, and ``--cpu`` set before ``comfy.model_management`` is first imported when ``cpu``."""
    if path not in sys.path:
        sys.path.insert(0, path)
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    comfy.cli_args.args.cpu = cpu


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall-clock times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def fill_random(module: torch.nn.Module, device: torch.device, seed: int = 0) -> None:
    """Normal(0, 0.02) weights and unit norm scales: speed does not depend on values, only on finiteness."""
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, p in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if p.ndim == 1 and (leaf == "scale" or ("norm" in name and leaf == "weight")):
            p.fill_(1.0)  # RMSNorm / LayerNorm scales
        else:
            p.normal_(0.0, 0.02, generator=generator)


def status_kb(field: str) -> Optional[int]:
    """A ``/proc/self/status`` field in KiB (VmRSS, VmHWM), or None off Linux."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def cpu_model() -> str:
    """The CPU's model name, for the machine line of a result."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
