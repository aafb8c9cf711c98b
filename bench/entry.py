"""``python -m bench.entry NAME [ARGS...]``: run the ``main(ARGS)`` of NAME's module the way ``run_all.sh`` does.

Ctrl-C anywhere, the imports included (torch takes seconds to import), ends with one line and exit
code 130 instead of a traceback.  Each entry module also handles Ctrl-C in its own ``main``.
"""
from __future__ import annotations

import importlib
import sys

from bench.runtime import startup

# name -> (module, what an interruption message calls it)
NAMES = {"orchestrate": ("bench.orchestrate", "run_all"), "testrun": ("bench.testrun", "run_all test"),
         "gate": ("bench.pipeline.gate", "gate")}


def main(argv=None) -> int:
    program = argv is None  # `python -m bench.entry`: the process ends with the command
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in NAMES:
        print(f"usage: python -m bench.entry {{{','.join(NAMES)}}} [ARGS...]", file=sys.stderr)
        return 2
    name, rest = argv[0], argv[1:]
    try:
        with startup.heavy_imports(program):
            mod = importlib.import_module(NAMES[name][0])
        return int(mod.main(rest) or 0)
    except KeyboardInterrupt:
        print(f"\n{NAMES[name][1]}: interrupted", file=sys.stderr)
        return 130
    finally:
        startup.settle(program)


if __name__ == "__main__":
    sys.exit(main())
