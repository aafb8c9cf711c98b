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


def device_name(device: str | torch.device = "cpu") -> str:
    d = torch.device(device)
    if d.type == "cuda":
        return torch.cuda.get_device_name(d)
    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


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
