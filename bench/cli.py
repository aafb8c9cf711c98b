"""``pmbench``: the command-line interface.

Each sub-command lives in its own module exposing ``add_parser(subparsers)``;
the module list below is the whole CLI.  ``--json`` prints exactly one JSON
object on stdout (human text goes to stderr or is suppressed).
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys

from .reducer import ConfigError

COMMANDS = [
    "bench.commands.list_cmd",
    "bench.commands.flops_cmd",
    "bench.commands.speed_cmd",
    "bench.commands.train_cmd",
    "bench.commands.eval_cmd",
    "bench.commands.data_cmd",
    "pm.cli",
    "bench.seg.cli",
]


class UserError(Exception):
    """Bad input: printed as one clear message, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pmbench", description="Token-reduction benchmark for Vision Transformers")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for mod in COMMANDS:
        importlib.import_module(mod).add_parser(sub)
    return p


def emit(obj: dict, as_json: bool, text: str = "") -> None:
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


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except (ConfigError, UserError, FileNotFoundError) as e:
        print(f"pmbench {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pmbench {args.command}: interrupted", file=sys.stderr)
        return 130
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


if __name__ == "__main__":
    sys.exit(main())
