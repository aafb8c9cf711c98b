"""Provenance stamp for every measured figure: device, versions, commit, date."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from functools import lru_cache
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]  # bench/runtime/env.py -> the repository


def _version(pkg: str) -> str:
    try:
        from importlib.metadata import version

        return version(pkg)
    except Exception:
        return "not installed"


@lru_cache(maxsize=None)
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_capability() -> str:
    """The vector instruction set torch's CPU kernels dispatch to (``AVX512``, ``AVX2``, ...).  Part of the
    device stamp: one model name (e.g. "AMD EPYC") covers CPU generations with and without AVX-512, whose
    kernels round differently, so their numbers differ in the last bits (and a fine-tuned row by a few tenths
    of a point, docs/statistics.md) and their speeds by tens of percent."""
    try:
        return torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001 - an older torch: the stamp just lacks it
        return ""


def device_name(device: str | torch.device = "cpu") -> str:
    d = torch.device(device)
    if d.type == "cuda":
        return torch.cuda.get_device_name(d)
    isa, n = cpu_capability(), torch.get_num_threads()
    return f"{cpu_name()} ({isa + ', ' if isa else ''}{n} thread{'' if n == 1 else 's'})"


@lru_cache(maxsize=None)
def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
        commit = out.stdout.strip() or "unknown"
        dirty = subprocess.run(
            # the report folders are this suite's own output: a run rewriting them does not make the code dirty
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)reports"], cwd=ROOT,
            capture_output=True, text=True, timeout=10,
        ).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except Exception:
        return "unknown"


def versions() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": _version("timm"),
        "mmseg": _version("mmsegmentation"),
        "mmcv": _version("mmcv"),
        "pmbench": _version("pmbench"),
    }


def stamp(device: str | torch.device = "cpu", **extra) -> dict:
    d = {
        "device": device_name(device),
        "device_type": torch.device(device).type,
        "threads": torch.get_num_threads(),
        **versions(),
        "commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host": platform.node(),
    }
    d.update(extra)
    return d


def default_device() -> str:
    return os.environ.get("PMBENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
