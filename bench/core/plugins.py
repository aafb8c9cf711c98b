"""Where methods and their extra commands come from; torch-free, so ``pmbench --help`` stays fast.

Reducers: the methods shipped with the suite are listed in :data:`BUILTIN` by import path (imported on
first use, so one broken method cannot break the others); external ones register through the
entry-point group ``pmbench.reducers`` (see :mod:`bench.core.registry`).

Commands: a method package may add ``pmbench`` sub-commands (e.g. a calibration front-end).  A
package of a built-in method lists them in a module-level ``PMBENCH_COMMANDS`` of its
``__init__``; an external package names such a list through the entry-point group
``pmbench.commands``::

    [project.entry-points."pmbench.commands"]
    mymethod = "my_package:PMBENCH_COMMANDS"

Each item is ``(command, module, help)``: ``module`` has ``add_parser(subparsers)`` (it is imported
only when its command runs); the list's own module must import nothing heavy.
"""
from __future__ import annotations

import importlib
import sys
from importlib import metadata

REDUCER_GROUP = "pmbench.reducers"
COMMAND_GROUP = "pmbench.commands"

BUILTIN: dict[str, str] = {
    "none": "bench.core.reducer:Reducer",
    "tome": "baselines.tome:ToMe",
    "evit": "baselines.evit:EViT",
    "dynamicvit": "baselines.dynamicvit:DynamicViT",
    "mstm": "baselines.mstm:MSTM",
    "pm": "pm.reducer:PruneAndMerge",
}


def entry_points(group: str) -> dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in metadata.entry_points(group=group)}


def method_commands() -> list[tuple[str, str, str]]:
    """``(command, module, help)`` of every method package's commands (built-in packages first)."""
    found: list[tuple[str, str, str]] = []
    for pkg in dict.fromkeys(path.partition(".")[0] for path in BUILTIN.values()):
        if pkg == "bench":
            continue
        try:
            found += list(getattr(importlib.import_module(pkg), "PMBENCH_COMMANDS", []))
        except ImportError:  # a method package that is not installed
            continue
    for name, ep in entry_points(COMMAND_GROUP).items():
        try:
            found += list(ep.load())
        except Exception as e:  # a broken plug-in must say so, not break every command
            print(f"pmbench: warning: plug-in commands '{name}' ({ep.value}) failed to load: {e}", file=sys.stderr)
    out: dict[str, tuple[str, str, str]] = {}
    for cmd, mod, help_text in found:
        out.setdefault(cmd, (cmd, mod, help_text))
    return list(out.values())
