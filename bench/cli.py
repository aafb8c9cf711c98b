"""``pmbench``: the command-line interface.

Each sub-command lives in its own module exposing ``add_parser(subparsers)``.  ``COMMANDS`` below is
the whole CLI: every command's name, its module and the one-line help ``pmbench --help`` shows; the
suite's own commands, then those method packages add (:mod:`bench.core.plugins`, e.g. ``pm-calibrate``).  Only
the module of the command being run is imported (the others are listed from this table), so
``pmbench --help`` and ``pmbench --version`` never load torch, timm or mmseg; the modules register
their commands with the same help text (tests/test_cli.py checks that the two agree).

``--json`` prints exactly one JSON object on stdout (human text goes to stderr or is suppressed).
Bad input: one line on stderr, exit code 2.  Ctrl-C: one line, exit code 130.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

from bench import __version__
from bench.core.errors import ConfigError
from bench.core.plugins import method_commands
from bench.runtime import startup

# (command, module that registers it, help): the order is the order of `pmbench --help`
COMMANDS = [
    ("list", "bench.commands.list_cmd", "list reducers and their options"),
    ("flops", "bench.commands.flops_cmd", "analytic GMACs of a model + reducer, with a per-block breakdown"),
    ("speed", "bench.commands.speed_cmd", "measured throughput (img/s) and speed-up vs the unreduced model"),
    ("train", "bench.commands.train_cmd", "train / fine-tune a model (+ reducer) with the suite's trainer"),
    ("eval", "bench.commands.eval_cmd", "accuracy (top-1/top-5) of a model + reducer"),
    ("calibrate", "bench.commands.calibrate_cmd",
     "learn a calibrated method's structure (e.g. PM) on training batches -> checkpoint (runs under torchrun)"),
    ("data", "bench.commands.data_cmd", "proxy data generation and data-set checks"),
    ("seg-eval", "bench.seg.cli", "Segmenter mIoU (sliding window, IoUMetric), GMACs and FPS with a reducer"),
    ("seg-train", "bench.seg.cli",
     "train / fine-tune a Segmenter with mmengine's Runner (CPU, torchrun gloo, CUDA); saves a clean checkpoint"),
    ("seg-cost", "bench.seg.cli", "analytic Segmenter GMACs per 512x512 window (no weights, no data)"),
]
# the commands method packages add (bench/core/plugins.py): after the suite's own
COMMANDS += [c for c in method_commands() if c[0] not in {n for n, _, _ in COMMANDS}]
COMMAND_NAMES = [c[0] for c in COMMANDS]


def _load_module(name: str):
    return importlib.import_module(name)


def build_parser(commands=None) -> argparse.ArgumentParser:
    """The ``pmbench`` parser.  ``commands``: the names whose modules are imported and whose full
    parsers are built (default: all); every other command is listed with its help only."""
    p = argparse.ArgumentParser(
        prog="pmbench", description="Token-reduction benchmark for Vision Transformers",
        epilog="`pmbench COMMAND --help` lists a command's options. Bad input exits with code 2, Ctrl-C with 130.")
    p.add_argument("--version", action="version", version=f"pmbench {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    full = set(COMMAND_NAMES if commands is None else commands)
    loaded: set[str] = set()
    for name, mod, help_text in COMMANDS:
        if name in full:
            if mod not in loaded:
                loaded.add(mod)
                _load_module(mod).add_parser(sub)
        elif not any(m == mod and n in full for n, m, _ in COMMANDS):
            sub.add_parser(name, help=help_text, add_help=False)  # listed only; built when it is run
    return p


_RESULT_FILE: list = []  # set by main() from $PMBENCH_RESULT_JSON (bench.runtime.launch's jobs)


def emit(obj: dict, as_json: bool, text: str = "") -> None:
    result_file = (_RESULT_FILE or [os.environ.get("PMBENCH_RESULT_JSON")])[-1]
    if result_file:  # a torchrun job of bench.runtime.launch: rank 0's object is also its result file
        from bench.runtime.results import atomic_write_text

        atomic_write_text(result_file, json.dumps(obj, indent=2, default=_json_default) + "\n")
    if as_json:
        json.dump(obj, sys.stdout, indent=2, default=_json_default)
        sys.stdout.write("\n")
    else:
        print(text)


def _json_default(o):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, tuple):
        return list(o)
    return str(o)


class _Tee:
    """sys.stderr that also writes to a per-rank log (the launcher reports a failing rank's tail)."""

    def __init__(self, stream, log):
        self._stream, self._log = stream, log

    def write(self, text):
        try:
            self._log.write(text)
            self._log.flush()
        except (ValueError, OSError):
            pass
        return self._stream.write(text)

    def flush(self):
        self._stream.flush()

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _launch_hooks() -> None:
    """Under bench.runtime.launch: the result file for :func:`emit`, and this rank's stderr copied into
    ``$PMBENCH_RANK_LOG_DIR/rank<RANK>.log``.  Both variables are taken out of the environment, so a
    process this command starts does not write into them."""
    rf = os.environ.pop("PMBENCH_RESULT_JSON", None)
    if rf:
        _RESULT_FILE.append(rf)
    d = os.environ.pop("PMBENCH_RANK_LOG_DIR", None)
    if d and not isinstance(sys.stderr, _Tee):
        try:
            os.makedirs(d, exist_ok=True)
            log = open(os.path.join(d, f"rank{os.environ.get('RANK', '0')}.log"), "a", encoding="utf-8")
        except OSError:
            return
        sys.stderr = _Tee(sys.stderr, log)


def main(argv=None) -> int:
    program = argv is None  # the console script or `python -m bench.cli`: the process ends with the command
    argv = list(sys.argv[1:] if argv is None else argv)
    _launch_hooks()
    command = next((a for a in argv if not a.startswith("-")), None)
    name = f"pmbench {command}" if command in COMMAND_NAMES else "pmbench"
    try:
        # only the command being run is imported (a typo or --help imports nothing heavy)
        with startup.heavy_imports(program):
            parser = build_parser([command] if command in COMMAND_NAMES else [])
        args = parser.parse_args(argv)
        rc = args.func(args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"{name}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # anywhere: imports, parsing, the command itself
        print(f"\n{name}: interrupted", file=sys.stderr)
        return 130
    finally:
        startup.settle(program)
    return int(rc or 0)


def one_line(e: BaseException) -> str:
    """The reason of an error as one line.  An error raised in a DataLoader worker reaches the main
    process with the worker's traceback in its message; the reason is its last line."""
    msg = str(e)
    if "Original Traceback" in msg:
        last = [ln for ln in msg.strip().splitlines() if ln.strip()][-1]
        head, sep, rest = last.partition(": ")
        msg = rest if sep and head.split(".")[-1] == type(e).__name__ else last
    return " ".join(ln.strip() for ln in msg.splitlines() if ln.strip())


if __name__ == "__main__":  # `python -m bench.cli`: run the one `bench.cli` the commands import
    from bench.cli import main as _main

    sys.exit(_main())
