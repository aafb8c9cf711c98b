"""bench/runtime/startup.py: the command lines pause the garbage collector during their imports and
freeze what exists before exit; called as functions (tests, library use) they change nothing."""
from __future__ import annotations

import subprocess
import sys
import textwrap

from bench.cli import main


def _python(code: str) -> str:
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout.strip()


def test_heavy_imports_pauses_collection_then_freezes_and_restores():
    out = _python("""
        import gc
        from bench.runtime import startup
        before = gc.get_freeze_count()
        with startup.heavy_imports():
            paused = not gc.isenabled()
            import json, decimal  # noqa: F401
        print(paused, gc.isenabled(), gc.get_freeze_count() > before)
        gc.disable()
        with startup.heavy_imports():
            pass
        print(gc.isenabled())  # a collector the caller had disabled stays disabled
    """)
    assert out.split() == ["True", "True", "True", "False"]


def test_inactive_forms_change_nothing():
    out = _python("""
        import gc
        from bench.runtime import startup
        before = gc.get_freeze_count()
        with startup.heavy_imports(False):
            inside = gc.isenabled()
        startup.settle(False)
        print(inside, gc.get_freeze_count() == before)
    """)
    assert out.split() == ["True", "True"]


def test_a_command_called_as_a_function_leaves_the_collector_alone(capsys):
    import gc

    before, enabled = gc.get_freeze_count(), gc.isenabled()
    assert main(["list", "--json"]) == 0
    # frozen objects that die leave the count, so it may fall; a freeze would raise it by thousands
    assert gc.get_freeze_count() <= before and gc.isenabled() == enabled


def test_the_command_line_freezes_before_exit():
    """``python -m bench.cli`` (program mode): the process freezes its objects before it ends."""
    out = _python("""
        import gc, sys
        from bench import cli
        sys.argv = ["pmbench", "list", "--json"]
        import contextlib, io
        with contextlib.redirect_stdout(io.StringIO()):
            rc = cli.main()
        print(rc, gc.get_freeze_count() > 100000, gc.isenabled())
    """)
    assert out.split() == ["0", "True", "True"]


def test_cpu_device_stamp_names_the_instruction_set():
    """Kernels for different vector instruction sets round differently (docs/statistics.md), so the CPU
    device line every report carries names the one torch dispatches to, next to the thread count."""
    import torch

    from bench.runtime import env

    isa = torch.backends.cpu.get_cpu_capability()
    assert isa and env.cpu_capability() == isa
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert env.device_name("cpu") == f"{env.cpu_name()} ({isa}, 2 threads)"
        torch.set_num_threads(1)
        assert env.device_name("cpu") == f"{env.cpu_name()} ({isa}, 1 thread)"
    finally:
        torch.set_num_threads(n)
