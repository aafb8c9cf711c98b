"""Start-up and exit of the command lines: the cores a process may use (:func:`usable_cpus`), and what
importing torch, torchvision and timm costs besides the import itself.  (Standard library only, so every
command line, the gate included, can use it.)

Those imports create a few million Python objects.  Python's cyclic garbage collector walks the
tracked ones again at each full collection that the import triggers, and once more when the
interpreter exits.  Measured on the 2-core machine (``python -c "import timm"``, import and exit): 8.5 s;
with collection paused during the import and the imported objects frozen (moved to the collector's
permanent generation, which no collection walks): 5.5 s.  Every ``pmbench`` command, every ``run_all``
stage process and every test that runs a command line pays this once per process.

Freezing only exempts the objects that exist at that moment; collection goes on as usual for
everything created afterwards.  Nothing here runs when the package is imported as a library.
"""
from __future__ import annotations

import contextlib
import gc
import os


def usable_cpus() -> int:
    """The cores this process may run on (a container or ``taskset`` can allow fewer than the machine has)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@contextlib.contextmanager
def heavy_imports(active: bool = True):
    """Pause the cyclic collector for the block (the command's imports), then freeze what exists.
    ``active=False`` (a command called as a function, e.g. by a test) changes nothing."""
    if not active:
        yield
        return
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def settle(active: bool = True) -> None:
    """Freeze what exists: called by a command line once its work is done, right before the process
    exits, so that the interpreter's last collection does not walk the millions of objects the imports
    made.  ``active=False`` (a command called as a function) changes nothing."""
    if active:
        gc.freeze()
